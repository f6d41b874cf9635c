"""The one Predictor of a bulk job: a model loaded once, predicting batches of rows.

:class:`Predictor` is Ray Data's callable class of a tile job and the Ray actor of scene jobs and
named pools. It turns decoded tiles into masks (and their fractions, uncertainty and class ids),
or scene windows into logits for the driver to stitch. Arrays of the model's input size go to the
model as they are; other sizes are cut into model-sized windows and stitched back, as Serve does:
all through one :class:`~segray.inference.segmenter.Segmenter`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segray import inference
from segray.bulk.config import PredictConfig
from segray.bulk.rows import objects, pack, pixels_of
from segray.errors import TileError
from segray.inference.segmenter import Segmenter

if TYPE_CHECKING:
    from segray.bulk.sinks import Sink
    from segray.models.saving import ModelCard


def render_options(config: PredictConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`segray.inference.render` a job asks for."""
    return {
        "output": config.output_mode,
        "class_index": config.class_index,
        "threshold": config.threshold,
    }


def segmenter_settings(config: PredictConfig) -> dict[str, Any]:
    """The :class:`~segray.inference.segmenter.Segmenter` settings a job asks for."""
    return {
        "overlap": config.overlap_for(None),
        "blend": config.blend,
        "batch_size": config.batch_size,
        "tta": config.tta,
        "mc_samples": config.mc_samples,
        "nodata": config.nodata,
    }


class Predictor:
    """A model loaded once, predicting batches of rows with a job's settings: the one Predictor
    of every bulk path. As Ray Data's callable class (``map_batches(Predictor, ...)``) it
    predicts its own job's tiles (:meth:`__call__`); as a Ray actor (a scene job's own, or a
    named pool's, :mod:`segray.bulk.pool`) it serves batches of whichever job sends them, with
    that job's :class:`PredictConfig`: tiles (:meth:`tiles`), scene windows (:meth:`windows`),
    or a pooled block end to end (:meth:`process`).

    ``settings`` (a :class:`PredictConfig`, or a pool's ``PoolConfig``) name the model, its
    precision and runtime; ``card`` is its card as the driver read it (not read again).
    Monte-Carlo dropout is switched on a job's first batch that asks for it, off on the next
    that does not; one model call at a time, whichever thread asks."""

    def __init__(self, settings: Any, card: ModelCard | None = None, pool: str = "") -> None:
        uri = settings.model
        self.model, self.card = inference.load(
            uri, settings.fs(uri), card, settings.precision, settings.runtime
        )
        self.config = settings if isinstance(settings, PredictConfig) else None
        if pool:  # what a job's first block needs, ready before any job comes
            from segray.bulk import stages  # noqa: F401  (the readers and writers)

            inference.warm_up(self.model, self.card)
        self._monte_carlo = False
        self._model_lock = threading.Lock()
        self._info = {
            "name": pool,
            "model": uri,
            "version": self.card.version,
            "precision": settings.precision or self.card.precision,
            "runtime": settings.runtime,
            "batches": 0,
            "started": time.time(),
            "pid": os.getpid(),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data: the tiles of the job this Predictor was made for → their masks."""
        assert self.config is not None, "a pool's Predictor serves jobs through tiles()"
        return self.tiles(self.config, batch)

    def tiles(self, config: PredictConfig, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded tiles → their uint8 masks and per-class fractions; with ``mc_samples`` an
        ``uncertainty`` column, with ``footprints`` or vectors a ``labels`` column (class ids),
        with vectors a ``confidence`` column, all uint8 bytes of the mask's shape."""
        return self._predict(config, batch, self._masks)

    def windows(self, config: PredictConfig, batch: dict[str, np.ndarray]) -> dict:
        """Scene windows → their float32 logits (the uncertainty as the last channel with
        ``mc_samples``), for the driver's scene assembler to stitch and render."""
        return self._predict(config, batch, self._logit_columns)

    def process(
        self, config: PredictConfig, sinks: Sequence[Sink], batch: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """A block of a pooled tile job, end to end: read and decode, predict (``actor_batch()``
        tiles a model call), write through ``sinks``; returns its manifest rows. Runs in the
        actor's ``io`` threads, so that one block's reads and writes overlap another's model
        calls."""
        from segray.bulk import stages

        read = stages.read_tiles(batch, config)
        n, size = len(read["input_uri"]), config.actor_batch()
        parts = [
            self.tiles(config, {k: v[i : i + size] for k, v in read.items()})
            for i in range(0, n, size)
        ]
        predicted = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        return stages.write_masks(predicted, config, sinks)

    def describe(self) -> dict[str, Any]:
        """What the Predictor holds and has done (a pool's ``segray pool list``)."""
        return dict(self._info)

    def ready(self) -> bool:
        return True

    def _predict(
        self, config: PredictConfig, batch: dict[str, np.ndarray], columns: Callable
    ) -> dict[str, np.ndarray]:
        """Predict every row without an error; rows that fail here get one."""
        start = time.perf_counter()
        errors = [str(e) for e in batch["error"]]
        with self._model_lock:
            wanted = config.mc_samples > 0
            if wanted != self._monte_carlo:
                from segray.models.layers import set_monte_carlo

                set_monte_carlo(self.model, wanted)
                self._monte_carlo = wanted
            self._info["batches"] += 1
            segmenter = Segmenter(self.model, self.card, **segmenter_settings(config))
            logits = self._logits(segmenter, batch, errors)
        n = len(errors)
        out = columns(segmenter, config, logits, n)
        share = (time.perf_counter() - start) / max(1, n)
        return {
            **batch,
            **out,
            "error": objects(errors),
            "seconds": np.asarray(batch["seconds"], np.float64) + share,
        }

    @staticmethod
    def _logits(
        segmenter: Segmenter, batch: dict[str, np.ndarray], errors: list[str]
    ) -> dict[int, np.ndarray]:
        """Logits (h, w, K) per row without an error (K + 1 with the uncertainty), NaN where
        the row's pixels were no data; the windows of all rows batched."""
        rows, tiles = [], []
        for i in range(len(errors)):
            if errors[i]:
                continue
            rows.append(i)
            tiles.append(pixels_of(batch, i))
        out = {}
        for i, result in zip(rows, segmenter.logits(tiles), strict=True):
            if isinstance(result, TileError):
                errors[i] = str(result)
            elif isinstance(result, Exception):
                uri = batch["input_uri"][i]
                errors[i] = f"{uri}: inference failed: {type(result).__name__}: {result}"
            else:
                out[i] = result
        return out

    @staticmethod
    def _logit_columns(
        segmenter: Segmenter, config: PredictConfig, logits: dict[int, np.ndarray], n: int
    ) -> dict[str, np.ndarray]:
        arrays = {i: one.astype(np.float32) for i, one in logits.items()}
        fractions = np.full((n, segmenter.card.num_classes), np.nan)
        return {**_packed(arrays, n), "class_fractions": fractions}

    @staticmethod
    def _masks(
        segmenter: Segmenter, config: PredictConfig, logits: dict[int, np.ndarray], n: int
    ) -> dict[str, np.ndarray]:
        fractions = np.full((n, segmenter.card.num_classes), np.nan)
        masks: dict[int, np.ndarray] = {}
        vectors = config.vectors is not None
        wanted = {
            "uncertainty": config.mc_samples > 0,
            "labels": config.footprints is not None or vectors,
            "confidence": vectors,
        }
        side = {name: [b""] * n for name, on in wanted.items() if on}
        groups: dict[tuple, list[int]] = {}  # rows of one shape are rendered together
        for i, one in logits.items():
            groups.setdefault(one.shape, []).append(i)
        for rows in groups.values():
            stack = np.stack([logits[i] for i in rows])
            finished = segmenter.finish(stack, **render_options(config), confidence=vectors)
            for i, out in zip(rows, finished, strict=True):
                masks[i], fractions[i] = out.mask, out.fractions
                for name in side:  # the Masks fields of the same names
                    side[name][i] = getattr(out, name).tobytes()
        return {
            **_packed(masks, n),
            "class_fractions": fractions,
            **{name: objects(values) for name, values in side.items()},
        }


def _packed(arrays: dict[int, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``pixels``/``shape``/``dtype`` columns of ``arrays`` by row; empty where a row has none."""
    packed = [(b"", [0, 0, 0], "uint8")] * n
    for i, array in arrays.items():
        packed[i] = pack(array)
    return {
        "pixels": objects([p[0] for p in packed]),
        "shape": np.asarray([[*p[1], 0, 0, 0][:3] for p in packed]),
        "dtype": objects([p[2] for p in packed]),
    }
