"""Bulk segmentation: tile collections or large scenes in, masks and a manifest out, on Ray Data.

Inputs are listed on the driver and those whose outputs exist are skipped (:mod:`.plan`); the rest
stream through read + decode tasks, a pool of Predictor actors (each loads the model once) and
encode + write tasks (:mod:`.stages`). Masks land under the output prefix at the input's relative
path (GeoTIFF with the tile's georeference for TIFF inputs, PNG otherwise), each written whole.
Every input gets one manifest row (:mod:`.manifest`); bad tiles become ``error`` rows and never
stop the job. With ``scene=True`` each input is a large GeoTIFF read window by window,
stitched and written band by band by a task of its own, several scenes at once
(:mod:`.scenes`). Optionally an uncertainty map (Monte-Carlo dropout) and GeoJSON footprints of
one class are written beside each mask. Inputs may come from a STAC file (:mod:`segray.io.stac`);
by default a STAC item goes beside each mask and a collection over them to the output root
(:mod:`.catalog`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from segray.bulk import pool, stages
from segray.bulk.config import PredictConfig
from segray.bulk.manifest import Manifest, PredictResult
from segray.bulk.plan import plan_sources
from segray.bulk.predictor import Predictor, render_options
from segray.bulk.rows import STOP
from segray.bulk.scenes import SceneJob, run_scenes
from segray.bulk.sinks import Sink, job_sinks, outputs
from segray.errors import ConfigError, StorageError
from segray.log import progress

if TYPE_CHECKING:
    import ray.data

    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)


def predict(config: PredictConfig, on_rows: Callable[[int], None] | None = None) -> PredictResult:
    """Run one bulk prediction job; logs and returns its :class:`PredictResult`.

    ``on_rows`` is called with the number of manifest rows each time the driver records some
    for inputs of this run (a progress display, or a benchmark's clock)."""
    from segray.models import saving

    start = time.monotonic()
    # the model file is vetted here, before any actor loads it: a refusal is one line
    card = saving.vet(config.model, config.fs(config.model))
    for name in ("class_index", "footprints"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < card.num_classes:
            raise ConfigError(f"{name} must lie in 0..{card.num_classes - 1}; got {value}")
    for value in config.vector_classes or ():
        if not 0 <= value < card.num_classes:
            raise ConfigError(f"vector_classes must lie in 0..{card.num_classes - 1}; got {value}")
    todo, done, sources = plan_sources(config)
    _check_found(config, todo, done)
    actors = None
    if todo and config.pool:  # refused before anything is written
        _init_ray(config)
        actors = pool.attach(config, card)
    manifest = Manifest(
        config.output,
        config.model,
        card.version,
        fs=config.fs(config.output),
        rows_per_part=config.manifest_rows,
        flush_s=config.manifest_flush_s,
        files=lambda mask: outputs(mask, config),
    )
    sinks = (*job_sinks(config, card, manifest.run_id), manifest)
    for sink in sinks:
        sink.on_write_start()
    manifest.record_settled(done, todo)
    masks = [out for _, out, reason in done if not reason]  # skipped: made by an earlier run
    stopped = ""
    if todo:
        _init_ray(config)
        unit = "scene" if config.scene else "tile"
        log.info("predicting %d %s(s), %d settled already", len(todo), unit, len(done))
        blocks = _blocks(todo, config, card, sinks[:-1], sources, actors)
        with progress(len(todo), f"{unit}s", unit) as bar:
            for block in blocks:
                for sink in sinks:
                    sink.on_rows(block)
                pairs = zip(block["output_uri"], block["status"], strict=True)
                masks += [str(out) for out, status in pairs if status == "ok"]
                bar.update(len(block["input_uri"]))
                if on_rows is not None:
                    on_rows(len(block["input_uri"]))
                stopped = next((str(s) for s in block[STOP] if s), "")
                if stopped:
                    blocks.close()  # Ray Data stops the pipeline: no new task starts
                    break
    if stopped:
        log.error("stopping: %s", stopped)
        for sink in sinks:
            try:
                sink.on_write_failed(stopped)
            except StorageError as exc:  # the output may be gone: the receipt comes first
                log.warning("%s: %s", type(sink).__name__, exc)
    else:
        for sink in sinks:
            sink.on_write_complete(masks)
    result = manifest.close(time.monotonic() - start, config.max_error_rate, stopped)
    log.info(result.summary())
    return result


def _check_found(config: PredictConfig, todo: list, done: list) -> None:
    if not (todo or done) and config.stac:
        raise ConfigError(f"no STAC item found in {config.stac}: check the URI")
    if not (todo or done):
        where = config.manifest or config.input
        raise ConfigError(
            f"no input found in {where} (suffixes {config.suffixes or 'default'}, pattern "
            f"{config.pattern!r}): check the URI, --pattern and --suffixes"
        )


def _blocks(
    todo: list[tuple[str, str]],
    config: PredictConfig,
    card: ModelCard,
    sinks: tuple[Sink, ...],
    sources: dict[str, dict[str, str]],
    actors: list | None,
) -> Generator[dict[str, Any], None, None]:
    """Manifest rows as they are written, a block at a time: a batch of tiles, or one scene."""
    if not config.scene:
        yield from _run_tiles(todo, config, card, sinks, sources, actors)
        return
    scenes = _run_scenes(todo, config, card, sinks, sources, actors)
    try:
        for row in scenes:
            row.setdefault(STOP, "")
            yield {k: [row.get(k)] for k in (*BLOCK_COLUMNS, *row)}
    finally:  # cancels the scene tasks still running, ends the actors
        scenes.close()


#: Columns every block of manifest rows has.
BLOCK_COLUMNS = ("input_uri", "status", "error", "output_uri", "class_fractions", "seconds")


def _init_ray(config: PredictConfig) -> None:
    import ray

    from segray.runtime import init_ray, join_cluster

    if config.pool:  # the pool lives on a running cluster: join it, never start one
        join_cluster(config.ray_address)
    elif not ray.is_initialized():
        init_ray(address=config.ray_address)


# --- the tile pipeline -------------------------------------------------------------------------


def _run_tiles(
    todo: list[tuple[str, str]],
    config: PredictConfig,
    card: ModelCard,
    sinks: tuple[Sink, ...],
    sources: dict[str, dict[str, str]],
    actors: list | None = None,
) -> Iterable[dict]:
    """Read, predict, write: on Ray Data with the job's own actor pool, or on ``actors``, a
    pool's (:func:`segray.bulk.pool.run_tiles`)."""
    items = [
        {"input_uri": i, "output_uri": o, "source": json.dumps(sources[o]) if o in sources else ""}
        for i, o in todo
    ]
    if actors:
        yield from pool.run_tiles(items, config, sinks, actors, card.num_classes)
        return
    import ray.data

    blocks = max(1, math.ceil(len(items) / config.tiles_per_task))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    cpus = config.cpus_per_task
    read = {"config": config}
    ds = ds.map_batches(stages.read_tiles, batch_size=None, fn_kwargs=read, num_cpus=cpus)
    ds = _predict_stage(ds, config, card, Predictor)
    write = {"config": config, "sinks": sinks}
    ds = ds.map_batches(stages.write_masks, batch_size=None, fn_kwargs=write, num_cpus=cpus)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _run_scenes(
    todo: list[tuple[str, str]],
    config: PredictConfig,
    card: ModelCard,
    sinks: tuple[Sink, ...],
    sources: dict[str, dict[str, str]],
    actors: list | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Scenes stitched and written by tasks of their own, several at once (:mod:`.scenes`), on
    ``actors`` (a pool's) or the job's own."""
    job = SceneJob(config, card, scene_window(config, card), render_options(config), sinks)
    return run_scenes(todo, job, sources, actors)


def scene_window(config: PredictConfig, card: ModelCard) -> tuple[int, int]:
    """The scene window: ``config.window`` square, else the model's own input size."""
    window = (config.window, config.window) if config.window else tuple(card.input_shape[:2])
    if not 0 <= config.overlap_for(window) < min(window):
        raise ConfigError(f"overlap must be smaller than the window {window}; got {config.overlap}")
    return window


def _predict_stage(
    ds: ray.data.Dataset, config: PredictConfig, card: ModelCard, predictor: type
) -> ray.data.Dataset:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        predictor,
        batch_size=config.actor_batch(),
        compute=ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
        fn_constructor_kwargs={"settings": config, "card": card},
    )
