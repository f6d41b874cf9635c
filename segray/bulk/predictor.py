"""The Ray Data callable classes of a bulk job: each loads the model once, then predicts batches.

:class:`TilePredictor` turns decoded tiles into masks (and their fractions, uncertainty and
class ids); :class:`WindowPredictor` turns scene windows into logits for the driver to stitch.
Arrays of the model's input size go to the model as they are; other sizes are cut into
model-sized windows and stitched back by :func:`segray.inference.run.infer_images`, as Serve does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from segray import inference
from segray.bulk.config import PredictConfig
from segray.bulk.rows import objects, pack, unpack, unpack_valid
from segray.errors import TileError
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


class _Predictor:
    """What both predictors share: the model, its card, and the logits of a batch of rows."""

    def __init__(
        self, config: PredictConfig, card: ModelCard | None = None, model: Any = None
    ) -> None:
        """Load the model of ``config`` (``card``: its card as the driver read it, not read
        again), or predict with ``model``, loaded already with its ``card`` (a pool's,
        :mod:`segray.bulk.pool`, which switches Monte-Carlo dropout for the job itself)."""
        self.config = config
        if model is None:
            model, card = inference.load(
                config.model, config.fs(config.model), card, config.precision
            )
            if config.mc_samples:  # once: every switch recompiles the model's predict function
                from segray.models.layers import set_monte_carlo  # imports Keras: after load

                set_monte_carlo(model, True)
        self.model, self.card = model, card

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict every row without an error; rows that fail here get one."""
        start = time.perf_counter()
        errors = [str(e) for e in batch["error"]]
        prepared, valid = self._prepare(batch, errors)
        logits = self._logits(prepared, batch["input_uri"], errors)
        logits = {i: inference.mark_nodata(one, valid[i]) for i, one in logits.items()}
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

    def _prepare(
        self, batch: dict[str, np.ndarray], errors: list[str]
    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray | None]]:
        """Model input of each row without an error, and the map of its pixels that are data."""
        prepared, valid = {}, {}
        for i, uri in enumerate(batch["input_uri"]):
            if errors[i]:
                continue
            shape = batch["shape"][i]
            array = unpack(batch["pixels"][i], shape, batch["dtype"][i])
            tile = Tile(array, str(uri), valid=unpack_valid(batch["valid"][i], shape))
            try:
                prepared[i] = inference.prepare(tile, self.card, self.config.nodata)
            except TileError as exc:
                errors[i] = str(exc)
            valid[i] = tile.valid
        return prepared, valid

    def _logits(
        self, prepared: dict[int, np.ndarray], uris: np.ndarray, errors: list[str]
    ) -> dict[int, np.ndarray]:
        """Logits (h, w, K) per row (K + 1 with the uncertainty), windows of all rows batched."""
        c = self.config
        results = inference.infer_images(
            self.model,
            list(prepared.values()),
            self.card,
            c.overlap_for(None),
            c.blend,
            c.batch_size,
            c.mc_samples,
            c.tta,
        )
        out = {}
        for i, result in zip(prepared, results, strict=True):
            if isinstance(result, Exception):
                errors[i] = f"{uris[i]}: inference failed: {type(result).__name__}: {result}"
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
        for i, out in self._render(logits).items():
            masks[i], fractions[i] = out["mask"], out["fractions"]
            for name in side:
                side[name][i] = out[name].tobytes()
        return {
            **_packed(masks, n),
            "class_fractions": fractions,
            **{name: objects(values) for name, values in side.items()},
        }

    def _render(self, logits: dict[int, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """``{row: {"mask", "fractions", "labels"[, "uncertainty"]}}``, a shape group at a time."""
        k = self.card.num_classes
        groups: dict[tuple, list[int]] = {}
        for i, one in logits.items():
            groups.setdefault(one.shape, []).append(i)
        out: dict[int, dict[str, np.ndarray]] = {}
        for rows in groups.values():
            stack = np.stack([logits[i] for i in rows])
            uncertainty = None
            if self.config.mc_samples:
                stack, uncertainty = stack[..., :-1], inference.render_uncertainty(stack[..., -1])
            masks, labels = inference.render_outputs(
                stack, self.card, **render_options(self.config)
            )
            for j, i in enumerate(rows):
                fractions = np.asarray(inference.class_fractions(labels[j], k))
                out[i] = {"mask": masks[j], "fractions": fractions, "labels": labels[j]}
                if self.config.vectors:
                    out[i]["confidence"] = inference.render_confidence(stack[j], labels[j])
                if uncertainty is not None:
                    out[i]["uncertainty"] = uncertainty[j]
        return out
