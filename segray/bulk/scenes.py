"""Scenes stitched from their windows' logits and written whole, with what goes beside them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray import inference
from segray.bulk.rows import SIDE_COLUMNS, STOP, georeference, unpack
from segray.bulk.stages import write_outputs
from segray.errors import OutputFull
from segray.inference.tiling import SceneStitcher
from segray.io.imagery import Tile
from segray.io.rasters import Window


@dataclass
class SceneState:
    """One scene in flight: where it goes, how many windows it waits for, what it holds so far."""

    input_uri: str
    output_uri: str
    n_windows: int
    shape: tuple[int, int]
    crs: str
    transform: list[float]
    seen: int = 0
    seconds: float = 0.0
    error: str = ""
    stitcher: SceneStitcher | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    counts: np.ndarray | None = None

    def drop(self, error: str) -> None:
        """Fail the scene and give its memory back at once."""
        self.error = self.error or error
        self.stitcher, self.arrays = None, {}


class SceneAssembler:
    """On the driver: stitches window logits into scene masks and writes each scene once whole.

    Holds, per scene in flight, its :class:`SceneStitcher` bands and its uint8 mask (H x W bytes),
    and as much again for each of the class-id labels (``footprints`` of a class, when the mask is
    not the class-id mask already) and the ``uncertainty`` map (the logits' last channel then).
    """

    def __init__(
        self,
        card: Any,
        geometry: tuple[tuple[int, int], int, str],
        render: dict[str, Any],
        *,
        endpoint: str | None = None,
        uncertainty: bool = False,
        footprints: dict[str, Any] | None = None,
        legend: dict[str, Any] | None = None,
    ) -> None:
        self.card, self.geometry, self.render, self.endpoint = card, geometry, render, endpoint
        self.uncertainty, self.footprints, self.legend = uncertainty, footprints, legend
        self._scenes: dict[str, SceneState] = {}

    def add_batch(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Take a batch of predicted windows; returns manifest rows of the scenes now finished."""
        finished = []
        for i, uri in enumerate(batch["input_uri"]):
            scene = self._scene(str(uri), batch, i)
            self._add_window(scene, batch, i)
            if scene.seen == scene.n_windows:
                finished.append(self._finish(self._scenes.pop(str(uri))))
        return finished

    def _scene(self, uri: str, batch: dict[str, np.ndarray], i: int) -> SceneState:
        if uri not in self._scenes:
            self._scenes[uri] = SceneState(
                input_uri=uri,
                output_uri=str(batch["output_uri"][i]),
                n_windows=int(batch["n_windows"][i]),
                shape=tuple(int(v) for v in batch["scene_shape"][i]),  # type: ignore[arg-type]
                crs=str(batch["crs"][i]),
                transform=[float(v) for v in batch["transform"][i]],
            )
        return self._scenes[uri]

    def _add_window(self, scene: SceneState, batch: dict[str, np.ndarray], i: int) -> None:
        scene.seen += 1
        scene.seconds += float(batch["seconds"][i])
        if scene.error or batch["error"][i]:
            scene.drop(str(batch["error"][i]))
            return
        if scene.stitcher is None:
            scene.stitcher = SceneStitcher(*scene.shape, *self.geometry)
            scene.arrays = self._arrays(scene.shape)
            scene.counts = np.zeros(self.card.num_classes, np.int64)
        logits = unpack(batch["pixels"][i], batch["shape"][i], batch["dtype"][i])
        for top, band in scene.stitcher.add(Window(*map(int, batch["window"][i])), logits):
            self._render_band(scene, top, band)

    def _arrays(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        arrays = {"mask": np.zeros(shape, np.uint8)}
        if self.footprints is not None:
            plain = self.render["output"] == "classes"
            arrays["labels"] = arrays["mask"] if plain else np.zeros(shape, np.uint8)
        if self.uncertainty:
            arrays["uncertainty"] = np.zeros(shape, np.uint8)
        return arrays

    def _render_band(self, scene: SceneState, top: int, band: np.ndarray) -> None:
        rows, arrays, k = slice(top, top + band.shape[0]), scene.arrays, self.card.num_classes
        if self.uncertainty:
            band, entropy = band[..., :-1], band[..., -1]
            arrays["uncertainty"][rows] = inference.render_uncertainty(entropy)
        mask, labels = inference.render_outputs(band[None], self.card, **self.render)
        assert scene.counts is not None
        scene.counts += np.bincount(labels.ravel(), minlength=k)[:k]
        arrays["mask"][rows] = mask[0]
        if "labels" in arrays:
            arrays["labels"][rows] = labels[0]

    def _finish(self, scene: SceneState) -> dict[str, Any]:
        row = {"input_uri": scene.input_uri, "seconds": scene.seconds}
        if scene.error:
            return {**row, "status": "error", "error": scene.error}
        start = time.perf_counter()
        crs, transform = georeference(scene.crs, scene.transform)
        like = Tile(np.empty((0, 0, 1)), scene.input_uri, "tiff", crs, transform)
        arrays = scene.arrays
        side = {k: arrays[k] for k in SIDE_COLUMNS if k in arrays}
        try:
            uris = write_outputs(
                scene.output_uri,
                arrays["mask"],
                like,
                self.endpoint,
                self.footprints,
                self.legend,
                **side,
            )
        except OutputFull as exc:  # no later write can succeed: the job stops after this row
            return {**row, "status": "error", "error": str(exc), STOP: str(exc)}
        except Exception as exc:  # storage or encoder failure: this scene's error, not the job's
            return {**row, "status": "error", "error": f"cannot write scene mask: {exc}"}
        row["seconds"] += time.perf_counter() - start
        assert scene.counts is not None
        counts = scene.counts  # no-data pixels are in no class
        fractions = counts / counts.sum() if counts.sum() else np.full(counts.size, np.nan)
        return {**row, "status": "ok", "class_fractions": fractions, **uris}
