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

from segray.bulk import catalog, stages
from segray.bulk.config import PredictConfig
from segray.bulk.manifest import Manifest, PredictResult, finished_rows
from segray.bulk.plan import list_outputs, outputs, plan_sources
from segray.bulk.predictor import TilePredictor, render_options
from segray.bulk.rows import STOP
from segray.bulk.scenes import SceneJob, run_scenes
from segray.errors import ConfigError, SegrayError
from segray.io import storage
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
    card = saving.load_card(config.model, endpoint=config.endpoint)
    for name in ("class_index", "footprints"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < card.num_classes:
            raise ConfigError(f"{name} must lie in 0..{card.num_classes - 1}; got {value}")
    todo, done, sources = plan_sources(config)
    if not (todo or done) and config.stac:
        raise ConfigError(f"no STAC item found in {config.stac}: check the URI")
    if not (todo or done):
        where = config.manifest or config.input
        raise ConfigError(
            f"no input found in {where} (suffixes {config.suffixes or 'default'}, pattern "
            f"{config.pattern!r}): check the URI, --pattern and --suffixes"
        )
    stale = storage.remove_stale_temps(config.output, older_than=time.time() - STALE_TEMP_S)
    if stale:
        log.info("removed %d temporary file(s) a killed writer left in %s", stale, config.output)
    manifest = Manifest(
        config.output,
        config.model,
        card.version,
        endpoint=config.endpoint,
        rows_per_part=config.manifest_rows,
        flush_s=config.manifest_flush_s,
    )
    _record_settled(manifest, done, config)
    masks = [out for _, out, reason in done if not reason]  # skipped: made by an earlier run
    stopped = ""
    if todo:
        _init_ray(config)
        unit = "scene" if config.scene else "tile"
        log.info("predicting %d %s(s), %d settled already", len(todo), unit, len(done))
        with progress(len(todo), f"{unit}s", unit) as bar:
            if config.scene:
                scenes = _run_scenes(todo, config, card, sources)
                for row in scenes:
                    stopped = row.pop(STOP, "")
                    manifest.add(**row)
                    if row["status"] == "ok":
                        masks.append(row["output_uri"])
                    bar.update(1)
                    if on_rows is not None:
                        on_rows(1)
                    if stopped:
                        scenes.close()
                        break
            else:
                batches = _run_tiles(todo, config, card, sources)
                for batch in batches:
                    manifest.add_batch(batch)
                    masks += [
                        str(out)
                        for out, status in zip(batch["output_uri"], batch["status"], strict=True)
                        if status == "ok"
                    ]
                    bar.update(len(batch["input_uri"]))
                    if on_rows is not None:
                        on_rows(len(batch["input_uri"]))
                    stopped = next((str(s) for s in batch[STOP] if s), "")
                    if stopped:
                        batches.close()  # Ray Data stops the pipeline: no new task starts
                        break
    if stopped:
        log.error("stopping: %s", stopped)
        _record_unreported(manifest, todo, config)
    elif config.stac_items:  # after a stop the rerun writes it
        _write_collection(config, card, masks)
    result = manifest.close(time.monotonic() - start, config.max_error_rate, stopped)
    log.info(result.summary())
    return result


#: Temporary files older than this when a job starts are a killed writer's (a live write takes
#: seconds): removed.
STALE_TEMP_S = 60.0


def _write_collection(config: PredictConfig, card: ModelCard, masks: list[str]) -> None:
    """The output's STAC collection over the masks of this job; a failure to write it is logged,
    the masks and their items are there (a rerun writes it again)."""
    try:
        uri = catalog.write_collection(config, card, masks, threads=config.io_threads)
    except SegrayError as exc:
        log.error("STAC collection not written: %s", exc)
        return
    if uri:
        log.info("STAC collection of %d mask(s): %s", len(set(masks)), uri)


def _record_unreported(manifest: Manifest, todo: list, config: PredictConfig) -> None:
    """After an early stop: the masks that batches in flight finished but the driver never saw
    get ``ok`` rows too (their class fractions unknown), so the receipt covers every mask the run
    wrote. A mask is written last and whole, so one that exists is complete."""
    seen = manifest.inputs()
    present = _settled_outputs(config)
    for input_uri, output_uri in todo:
        if input_uri not in seen and output_uri in present:
            manifest.add(input_uri, "ok", **outputs(output_uri, config))


def _settled_outputs(config: PredictConfig, pause_s: float = 1.0, limit_s: float = 60.0) -> set:
    """The outputs once writes already under way have landed: listed until two listings a
    pause apart agree (a write task that was running when the job stopped takes under a
    second; none is started after)."""
    present, deadline = set(list_outputs(config)), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(pause_s)
        again = set(list_outputs(config))
        if again == present:
            break
        present = again
    return present


def _record_settled(manifest: Manifest, done: list, config: PredictConfig) -> None:
    """Manifest rows of the inputs settled before the run: refused ones (``error``), and those
    whose outputs exist (``skipped``, with the class fractions of the run that made them)."""
    earlier = None
    for input_uri, output_uri, reason in done:
        if reason:
            manifest.add(input_uri, "error", reason)
            continue
        if earlier is None:
            earlier = finished_rows(config.output, endpoint=config.endpoint)
        fractions = earlier.get(input_uri)
        manifest.add(input_uri, "skipped", class_fractions=fractions, **outputs(output_uri, config))


def _init_ray(config: PredictConfig) -> None:
    import ray

    from segray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(address=config.ray_address)


# --- the tile pipeline -------------------------------------------------------------------------


def mask_legend(config: PredictConfig, card: ModelCard) -> dict[str, Any]:
    """The colour table and metadata of this job's masks."""
    from segray import inference

    return inference.mask_legend(card, config.output_mode, config.class_index)


def footprint_options(config: PredictConfig, card: ModelCard) -> dict[str, Any] | None:
    """What the writers need to vectorise the ``footprints`` class (None when off)."""
    if config.footprints is None:
        return None
    return {
        "class_index": config.footprints,
        "name": card.names()[config.footprints],
        "to_crs": config.footprints_crs,
    }


def _run_tiles(
    todo: list[tuple[str, str]],
    config: PredictConfig,
    card: ModelCard,
    sources: dict[str, dict[str, str]] | None = None,
) -> Iterable[dict]:
    import ray.data

    sources = sources or {}
    items = [
        {"input_uri": i, "output_uri": o, "source": json.dumps(sources[o]) if o in sources else ""}
        for i, o in todo
    ]
    blocks = max(1, math.ceil(len(items) / config.tiles_per_task))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    cpus = config.cpus_per_task
    read = {"config": config}
    ds = ds.map_batches(stages.read_tiles, batch_size=None, fn_kwargs=read, num_cpus=cpus)
    ds = _predict_stage(ds, config, TilePredictor)
    legend = mask_legend(config, card)
    write = {
        "config": config,
        "footprints": footprint_options(config, card),
        "legend": legend,
        "stac_item": catalog.item_options(config, card, legend),
    }
    ds = ds.map_batches(stages.write_masks, batch_size=None, fn_kwargs=write, num_cpus=cpus)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _run_scenes(
    todo: list[tuple[str, str]],
    config: PredictConfig,
    card: ModelCard,
    sources: dict[str, dict[str, str]] | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Scenes stitched and written by tasks of their own, several at once (:mod:`.scenes`)."""
    legend = mask_legend(config, card)
    job = SceneJob(
        config,
        card,
        scene_window(config, card),
        render_options(config),
        legend,
        footprint_options(config, card),
        catalog.item_options(config, card, legend),
    )
    return run_scenes(todo, job, sources)


def scene_window(config: PredictConfig, card: ModelCard) -> tuple[int, int]:
    """The scene window: ``config.window`` square, else the model's own input size."""
    window = (config.window, config.window) if config.window else tuple(card.input_shape[:2])
    if not 0 <= config.overlap < min(window):
        raise ConfigError(f"overlap must be smaller than the window {window}; got {config.overlap}")
    return window


def _predict_stage(
    ds: ray.data.Dataset, config: PredictConfig, predictor: type
) -> ray.data.Dataset:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        predictor,
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
        fn_constructor_kwargs={"config": config},
    )
