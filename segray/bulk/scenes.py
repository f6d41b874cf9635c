"""Scenes in parallel, off the driver: a Ray task per scene stitches and writes it band by band.

Each scene task opens its scene once, reads its windows in row-major order a batch at a time,
has the job's Predictor actors (shared by every scene) turn them into logits while it reads the
next batch, blends them with a :class:`~segray.inference.tiling.SceneStitcher`, and renders and
writes each band of rows as soon as every window covering it has arrived
(:class:`~segray.io.rasters.BandWriter`, a local temporary file). At the end the mask becomes a
COG and is written whole, after the files beside it. Several scenes run at once
(``scenes_at_once``); the driver only starts tasks and records their manifest rows.

What a scene task holds: the stitcher's float sums of about one window row
(``(window + stride) x width x classes x 4`` bytes), the window batches in flight, and one
band of rendered rows: never the scene. Footprints are the one exception: they are vectorised
from the scene's class ids read back whole (one byte a pixel).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray import inference
from segray.bulk.config import PredictConfig
from segray.bulk.pool import own_actors
from segray.bulk.rows import STOP, columns, tile_columns, unpack
from segray.bulk.scheduler import bounded
from segray.bulk.sinks import LocalFile, Output, Sink, files_of, legend_of, write_files
from segray.errors import OutputFull, SegrayError, TileError
from segray.inference.segmenter import Segmenter
from segray.inference.tiling import SceneStitcher, scene_windows
from segray.io import gdal, imagery
from segray.io.imagery import Tile
from segray.io.rasters import MAX_SCENE_PIXELS, BandWriter, Window
from segray.io.readers import RasterHeader, RasterReader, open_reader

if TYPE_CHECKING:
    from affine import Affine

    from segray.models.saving import ModelCard

#: Window batches of one scene at the Predictors at once: one computed while the next is read.
BATCHES_AHEAD = 2
#: Prefix of a scene task's local temporary folder, and the age (seconds since its last write)
#: after which such a folder is a killed task's and is removed by the next scene task.
TEMP_PREFIX = "segray-scene-"
STALE_TEMP_S = 3600.0
#: GDAL's block cache in a scene task, in MiB: a few rows of the scene's blocks. By default GDAL
#: may keep 5 % of the machine's memory, so a task that read a scene window by window ended up
#: holding most of it decoded (276 vs 83 MiB after reading an 8,192² RGB scene).
SCENE_CACHE_MIB = 64


@dataclass(frozen=True)
class SceneJob:
    """What every scene task of a job shares: its settings and how masks are made."""

    config: PredictConfig
    card: ModelCard
    window: tuple[int, int]
    render: dict[str, Any]
    #: The job's outputs, in writing order, the mask's last (:func:`segray.bulk.sinks.job_sinks`).
    sinks: tuple[Sink, ...]

    @property
    def legend(self) -> dict[str, Any]:
        """The colour table and metadata of the masks."""
        return legend_of(self.sinks)

    @property
    def overlap(self) -> int:
        """The overlap of this job's scene windows."""
        return self.config.overlap_for(self.window)

    @property
    def uncertainty(self) -> bool:
        return self.config.mc_samples > 0

    @property
    def segmenter(self) -> Segmenter:
        """The job's checks and rendering: the windows' logits come from Predictor actors."""
        return Segmenter(None, self.card, mc_samples=self.config.mc_samples)


def run_scenes(
    todo: list[tuple[str, str]],
    job: SceneJob,
    sources: dict[str, dict[str, str]] | None = None,
    actors: list | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Manifest rows of the scenes in ``todo`` (``(input, output)`` URIs), as they finish;
    ``sources``: the STAC item of each output (:func:`segray.bulk.plan.plan_sources`).

    Starts ``concurrency`` Predictor actors (or uses ``actors``, a pool's), then keeps
    ``scenes_at_once`` scene tasks running (default: 2 per actor); closing the generator cancels
    the tasks still running and ends the job's own actors.
    """
    import ray

    c = job.config
    # the model loaded before any scene task takes a CPU: tasks waiting on actors that cannot be
    # placed would hold the CPUs those actors need; and a model that cannot load fails the job
    predictors = actors or own_actors(c, job.card)
    task = ray.remote(stitch_scene).options(num_cpus=c.cpus_per_task, max_retries=1)
    at_once = c.scenes_at_once or 2 * len(predictors)

    def submit(i: int, uris: tuple[str, str]) -> Any:
        source = (sources or {}).get(uris[1])
        return task.remote(*uris, job, predictors, i, source)

    def failed(uris: tuple[str, str], exc: Exception) -> dict[str, Any]:
        return _failed(uris[0], f"{uris[0]}: scene task failed: {exc}", 0.0)

    try:
        yield from bounded(todo, submit, at_once, failed)
    finally:
        for one in predictors if not actors else ():  # a pool's outlive the job
            ray.kill(one)


def _failed(input_uri: str, error: str, seconds: float, **extra: str) -> dict[str, Any]:
    return {"input_uri": input_uri, "status": "error", "error": error, "seconds": seconds, **extra}


def stitch_scene(
    input_uri: str,
    output_uri: str,
    job: SceneJob,
    predictors: list,
    index: int = 0,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ray task: predict, stitch and write one scene; returns its manifest row (an error row for
    whatever fails, with :data:`STOP` when the output can take no more writes)."""
    start = time.perf_counter()
    remove_stale_folders(tempfile.gettempdir(), time.time() - STALE_TEMP_S)
    folder = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    c, writer = job.config, None
    try:
        with gdal.env(GDAL_CACHEMAX=SCENE_CACHE_MIB), _opened(input_uri, job) as (scene, head):
            size = (head.height, head.width)
            writer = SceneWriter(folder, job, size, head.crs, head.transform)
            windows = scene_windows(*size, job.window, job.overlap)
            stitcher = SceneStitcher(*size, job.window, job.overlap, c.blend)
            for window, logits in _predicted(scene, windows, job, predictors, index):
                for top, band in stitcher.add(window, logits):
                    writer.add_band(top, band)
            uris = writer.finish(output_uri, input_uri, source)
    except OutputFull as exc:  # no later write can succeed: the job stops after this row
        return _failed(input_uri, str(exc), time.perf_counter() - start, **{STOP: str(exc)})
    except SegrayError as exc:
        return _failed(input_uri, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a reader, model or encoder failure: this scene's, not the job's
        error = f"{input_uri}: {type(exc).__name__}: {exc}"
        return _failed(input_uri, error, time.perf_counter() - start)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(folder, ignore_errors=True)
    counts = writer.counts  # no-data pixels are in no class
    fractions = counts / counts.sum() if counts.sum() else np.full(counts.size, np.nan)
    return {
        "input_uri": input_uri,
        "status": "ok",
        "error": "",
        "seconds": time.perf_counter() - start,
        "class_fractions": fractions,
        **uris,
    }


def remove_stale_folders(parent: str, older_than: float) -> int:
    """Remove the scene folders under ``parent`` with nothing written since ``older_than`` (a
    ``time.time()``): what killed scene tasks left (a live task writes a band every few
    seconds). Returns how many."""
    removed = 0
    for entry in os.scandir(parent):
        if not (entry.name.startswith(TEMP_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            stamps = [entry.stat().st_mtime] + [f.stat().st_mtime for f in os.scandir(entry.path)]
        except OSError:  # its task finished and removed it meanwhile
            continue
        if max(stamps) < older_than:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def _opened(uri: str, job: SceneJob) -> Iterator[tuple[RasterReader, RasterHeader]]:
    """The scene's reader and its header, checked; a scene that cannot be opened says so."""
    config = job.config
    with open_reader(uri, config.fs(uri)) as reader:
        try:
            head = reader.header()
        except Exception as exc:
            raise TileError(uri, f"cannot open scene: {exc}", "unreadable") from exc
        job.segmenter.check(head, MAX_SCENE_PIXELS, config.bands)
        yield reader, head


def _predicted(
    scene: RasterReader, windows: list[Window], job: SceneJob, predictors: list, index: int
) -> Iterator[tuple[Window, np.ndarray]]:
    """``(window, logits)`` in row-major order; batches go round the Predictors, starting at
    this scene's ``index``, :data:`BATCHES_AHEAD` at a time."""
    import ray

    size = job.config.batch_size
    batches = [windows[i : i + size] for i in range(0, len(windows), size)]
    in_flight: collections.deque = collections.deque()
    for k, batch in enumerate(batches):
        predictor = predictors[(index + k) % len(predictors)]
        ref = predictor.windows.remote(job.config, _read_batch(scene, batch, job))
        in_flight.append((batch, ref))
        if len(in_flight) >= BATCHES_AHEAD:
            yield from _logits(*in_flight.popleft(), ray.get)
    while in_flight:
        yield from _logits(*in_flight.popleft(), ray.get)


def _read_batch(scene: RasterReader, windows: list[Window], job: SceneJob) -> dict[str, np.ndarray]:
    """A batch of window rows (see :class:`segray.bulk.rows.WindowRow`) for a Predictor."""
    uri = scene.uri
    rows = []
    for win in windows:
        try:
            tile = scene.read(win, bands=job.config.bands)
        except Exception as exc:  # a broken block fails this scene, not the job
            where = [win.row, win.col, win.height, win.width]
            raise TileError(uri, f"cannot read window {where}: {exc}", "unreadable") from exc
        rows.append({"input_uri": uri, **tile_columns(tile)})
    return columns(rows)


def _logits(windows: list[Window], ref: Any, get: Any) -> Iterator[tuple[Window, np.ndarray]]:
    out = get(ref)
    for i, win in enumerate(windows):
        if out["error"][i]:  # already "<scene>: <reason>"
            raise SegrayError(str(out["error"][i]))
        yield win, unpack(out["pixels"][i], out["shape"][i], out["dtype"][i])


class SceneWriter:
    """A scene's mask (and the files beside it) rendered and written band by band to local
    temporary files, then written whole to the output: side files first, the mask last."""

    def __init__(
        self,
        folder: str,
        job: SceneJob,
        shape: tuple[int, int],
        crs: str | None,
        transform: Affine | None,
    ) -> None:
        self.job, self.shape, self.segmenter = job, shape, job.segmenter
        self.crs, self.transform = crs, transform
        self.counts = np.zeros(job.card.num_classes, np.int64)
        geo = {"crs": self.crs, "transform": self.transform, "nodata": imagery.MASK_NODATA}
        legend = job.legend
        palette, tags = legend.get("palette"), legend.get("tags")
        mask = BandWriter(folder, "mask", shape, **geo, colormap=palette, tags=tags)
        self.rasters = {"mask": mask}
        needs_labels = any(sink.needs_labels for sink in job.sinks)
        if needs_labels and job.render["output"] != "classes":
            self.rasters["labels"] = BandWriter(folder, "labels", shape, **geo)
        if any(sink.needs_confidence for sink in job.sinks):
            self.rasters["confidence"] = BandWriter(folder, "confidence", shape, **geo)
        if job.uncertainty:
            tags = inference.UNCERTAINTY_TAGS
            self.rasters["uncertainty"] = BandWriter(folder, "uncertainty", shape, **geo, tags=tags)

    def add_band(self, top: int, band: np.ndarray) -> None:
        """Render a stitched band of logits (rows, width, K [+1 uncertainty]) and write it."""
        k = self.job.card.num_classes
        confidence = "confidence" in self.rasters
        (out,) = self.segmenter.finish(band[None], **self.job.render, confidence=confidence)
        self.counts += np.bincount(out.labels.ravel(), minlength=k)[:k]
        for name, raster in self.rasters.items():  # the Masks fields of the same names
            raster.write(top, getattr(out, name))

    def finish(
        self, output_uri: str, input_uri: str, source: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Write the outputs, the mask last; returns their manifest URIs. ``source``: the STAC
        item the scene comes from, for the mask's own item."""
        uncertainty = self.rasters.get("uncertainty")
        output = Output(
            uri=output_uri,
            input_uri=input_uri,
            like=Tile(np.empty((0, 0, 1)), input_uri, "tiff", self.crs, self.transform),
            shape=self.shape,
            mask=LocalFile(self.rasters["mask"].cog()),
            uncertainty=LocalFile(uncertainty.cog()) if uncertainty is not None else None,
            labels=self.rasters.get("labels", self.rasters["mask"]).read,
            confidence=self.rasters["confidence"].read if "confidence" in self.rasters else None,
            source=source,
        )
        files, uris = files_of(self.job.sinks, output)
        write_files(self.job.config.fs(output_uri), files)
        return uris

    def close(self) -> None:
        """Close the temporary files (idempotent)."""
        for raster in self.rasters.values():
            raster.close()
