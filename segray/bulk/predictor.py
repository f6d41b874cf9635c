"""The Ray Data callable classes of a bulk job: each loads the model once, then predicts batches.

:class:`TilePredictor` turns decoded tiles into masks (and their fractions, uncertainty and
class ids); :class:`WindowPredictor` turns scene windows into logits for the driver to stitch.
Arrays of the model's input size go to the model as they are; other sizes are cut into
model-sized windows and stitched back, as Serve does: both go through one
:class:`~segray.inference.segmenter.Segmenter`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.bulk.config import PredictConfig
from segray.bulk.rows import objects, pack, unpack, unpack_valid
from segray.errors import TileError
from segray.inference.segmenter import Segmenter
from segray.io.imagery import Tile

if TYPE_CHECKING:
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


class _Predictor:
    """What both predictors share: a :class:`Segmenter` of the job's model and settings, and
    the joined logits of a batch of rows."""

    def __init__(
        self, config: PredictConfig, card: ModelCard | None = None, model: Any = None
    ) -> None:
        """Load the model of ``config`` (``card``: its card as the driver read it, not read
        again), or predict with ``model``, loaded already with its ``card`` (a pool's,
        :mod:`segray.bulk.pool`, which switches Monte-Carlo dropout for the job itself)."""
        self.config = config
        settings = segmenter_settings(config)
        if model is None:
            uri = config.model
            self.segmenter = Segmenter.load(
                uri, config.fs(uri), card, config.precision, config.runtime, **settings
            )
        else:
            self.segmenter = Segmenter(model, card, **settings)
        self.card = self.segmenter.card

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict every row without an error; rows that fail here get one."""
        start = time.perf_counter()
        errors = [str(e) for e in batch["error"]]
        logits = self._logits(batch, errors)
        n = len(errors)
        columns = self._columns(logits, n)
        share = (time.perf_counter() - start) / max(1, n)
        return {
            **batch,
            **columns,
            "error": objects(errors),
            "seconds": np.asarray(batch["seconds"], np.float64) + share,
        }

    def _columns(self, logits: dict[int, np.ndarray], n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _logits(self, batch: dict[str, np.ndarray], errors: list[str]) -> dict[int, np.ndarray]:
        """Logits (h, w, K) per row without an error (K + 1 with the uncertainty), NaN where
        the row's pixels were no data; the windows of all rows batched."""
        rows, tiles = [], []
        for i, uri in enumerate(batch["input_uri"]):
            if errors[i]:
                continue
            shape = batch["shape"][i]
            array = unpack(batch["pixels"][i], shape, batch["dtype"][i])
            rows.append(i)
            tiles.append(Tile(array, str(uri), valid=unpack_valid(batch["valid"][i], shape)))
        out = {}
        for i, result in zip(rows, self.segmenter.logits(tiles), strict=True):
            if isinstance(result, TileError):
                errors[i] = str(result)
            elif isinstance(result, Exception):
                uri = batch["input_uri"][i]
                errors[i] = f"{uri}: inference failed: {type(result).__name__}: {result}"
            else:
                out[i] = result
        return out


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


class WindowPredictor(_Predictor):
    """Scene windows → their float32 logits (the uncertainty as the last channel with
    ``mc_samples``), for the driver's scene assembler to stitch and render."""

    def _columns(self, logits: dict[int, np.ndarray], n: int) -> dict[str, np.ndarray]:
        arrays = {i: one.astype(np.float32) for i, one in logits.items()}
        fractions = np.full((n, self.card.num_classes), np.nan)
        return {**_packed(arrays, n), "class_fractions": fractions}


class TilePredictor(_Predictor):
    """Tiles → their uint8 masks and per-class fractions; with ``mc_samples`` an
    ``uncertainty`` column, with ``footprints`` a ``labels`` column (class ids), both uint8 bytes
    of the mask's shape."""

    def _columns(self, logits: dict[int, np.ndarray], n: int) -> dict[str, np.ndarray]:
        k = self.card.num_classes
        fractions = np.full((n, k), np.nan)
        masks: dict[int, np.ndarray] = {}
        c = self.config
        vectors = c.vectors is not None
        wanted = {
            "uncertainty": c.mc_samples > 0,
            "labels": c.footprints is not None or vectors,
            "confidence": vectors,
        }
        side = {name: [b""] * n for name, on in wanted.items() if on}
        groups: dict[tuple, list[int]] = {}  # rows of one shape are rendered together
        for i, one in logits.items():
            groups.setdefault(one.shape, []).append(i)
        for rows in groups.values():
            stack = np.stack([logits[i] for i in rows])
            finished = self.segmenter.finish(stack, **render_options(c), confidence=vectors)
            for i, out in zip(rows, finished, strict=True):
                masks[i], fractions[i] = out.mask, out.fractions
                for name in side:  # the Masks fields of the same names
                    side[name][i] = getattr(out, name).tobytes()
        return {
            **_packed(masks, n),
            "class_fractions": fractions,
            **{name: objects(values) for name, values in side.items()},
        }
