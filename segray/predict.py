"""Bulk segmentation: tile collections or large scenes in, masks and a manifest out, on Ray Data.

Tile URIs are listed on the driver and those whose outputs exist are skipped; the rest stream
through read + decode tasks, a pool of :class:`Predictor` actors (each loads the model once) and
encode + write tasks. Masks land under the output prefix at the input's relative path (GeoTIFF
with the tile's georeference for TIFF inputs, PNG otherwise), each written whole (temp + rename,
or one PUT). Every input gets one manifest row; bad tiles become ``error`` rows and never stop the
job.
With ``scene=True`` each input is a large GeoTIFF read window by window (see :mod:`segray.tiling`)
and stitched back into one scene mask by the driver. Optionally an uncertainty map (Monte-Carlo
dropout) and GeoJSON footprints of one class are written beside each mask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray import inference, stages, tiling
from segray.imagery import Tile, TileError
from segray.manifest import Manifest, PredictResult, outputs, plan
from segray.stages import pack, unpack

if TYPE_CHECKING:
    import ray.data

    from segray.modelio import ModelCard


@dataclass
class PredictConfig:
    """Settings of one bulk prediction job; the defaults run on a laptop CPU.

    - ``model``: training run folder, model folder or ``.keras`` file, local or s3://.
    - ``input``: folder or s3:// prefix (or one file), filtered by ``suffixes`` (default: image
      suffixes; ``.tif``/``.tiff`` with ``scene``) and the glob ``pattern``. With ``manifest`` (a
      Parquet file with an ``input_uri`` or ``uri`` column, or text with one URI a line) the URIs
      come from there, and ``input``, if given, is the base their relative paths start from.
    - ``output``: masks go to ``output/<relative path>`` (``.tif`` for TIFF inputs, else ``.png``);
      the manifest of each run to ``output/_manifest/run-<time>-<id>/``.
    - ``batch_size`` rows per model call; ``concurrency`` Predictor actors, each with
      ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs; read/write tasks reserve
      ``cpus_per_task`` CPUs and use ``io_threads`` threads (they mostly wait on storage).
    - ``output_mode``/``class_index``/``threshold``: as :func:`segray.inference.render`.
    - ``bands``: 1-based bands to read; default the model card's.
    - ``overwrite`` redoes inputs whose outputs exist; ``max_error_rate`` is the share of inputs
      in error above which the job fails.
    - ``mc_samples`` > 0: Monte-Carlo dropout with that many passes; the mask is that of the mean
      probability, and ``<name>.uncertainty.<ext>`` beside it holds round(255 x entropy) in
      uint8 (georeferenced like the mask).
    - ``footprints``: a class index; ``<name>.geojson`` beside each mask holds the polygons of
      that class in the class-id mask at ``threshold`` (in the tile's or scene's CRS, else in
      pixels; simplified by half a pixel).
    - ``scene``: inputs are large GeoTIFFs cut into ``window`` px windows (default: the model's
      input size) overlapping by ``overlap``, stitched by ``blend`` (see :mod:`segray.tiling`).
      ``overlap`` and ``blend`` also apply to tiles of another size than the model's input.
    - ``ray_address``: Ray to join (default ``RAY_ADDRESS``, else a local Ray is started).
    """

    model: str
    input: str = ""
    output: str = ""
    endpoint: str | None = None
    suffixes: tuple[str, ...] | None = None
    pattern: str | None = None
    manifest: str | None = None
    batch_size: int = 16
    concurrency: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    cpus_per_task: float = 0.5
    output_mode: str = "classes"
    class_index: int = 1
    threshold: float | None = None
    bands: tuple[int, ...] | None = None
    overwrite: bool = False
    max_error_rate: float = 0.0
    scene: bool = False
    window: int | None = None
    overlap: int = tiling.OVERLAP
    blend: str = tiling.BLEND
    mc_samples: int = 0
    footprints: int | None = None
    io_threads: int = 8
    manifest_rows: int = 10_000
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output is required: a folder or s3:// prefix for the masks")
        if not (self.input or self.manifest):
            raise ValueError("give input (a folder or s3:// prefix) or manifest (a list of URIs)")
        _choice("output_mode", self.output_mode, inference.OUTPUTS)
        _choice("blend", self.blend, tiling.BLENDS)
        for name in ("batch_size", "concurrency", "io_threads", "manifest_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if self.window is not None and not 0 <= self.overlap < self.window:
            raise ValueError(
                f"overlap must lie in 0..window-1 ({self.window - 1}); got {self.overlap}"
            )
        if int(self.mc_samples) < 0:
            raise ValueError(f"mc_samples must be >= 0; got {self.mc_samples!r}")
        if self.footprints is not None and int(self.footprints) < 0:
            raise ValueError(f"footprints must be a class index >= 0; got {self.footprints!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must lie in [0, 1]; got {self.max_error_rate}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1]; got {self.threshold}")
        self.bands = tuple(self.bands) if self.bands else None
        self.suffixes = tuple(s.lower() for s in self.suffixes) if self.suffixes else None


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def predict(config: PredictConfig, echo: Callable[[str], None] = print) -> PredictResult:
    """Run one bulk prediction job; prints and returns its :class:`PredictResult`."""
    from segray import modelio

    start = time.monotonic()
    card = modelio.load_card(config.model, endpoint=config.endpoint)
    for name in ("class_index", "footprints"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < card.num_classes:
            raise ValueError(f"{name} must lie in 0..{card.num_classes - 1}; got {value}")
    todo, done = plan(config)
    if not (todo or done):
        where = config.manifest or config.input
        raise ValueError(
            f"no input found in {where} (suffixes {config.suffixes or 'default'}, pattern "
            f"{config.pattern!r}): check the URI, --pattern and --suffixes"
        )
    manifest = Manifest(
        config.output,
        config.model,
        card.version,
        endpoint=config.endpoint,
        rows_per_part=config.manifest_rows,
    )
    for input_uri, output_uri, reason in done:
        status = "error" if reason else "skipped"
        manifest.add(input_uri, status, reason, **({} if reason else outputs(output_uri, config)))
    if todo:
        _init_ray(config)
        if config.scene:
            for row in _run_scenes(todo, config, card):
                manifest.add(**row)
        else:
            for batch in _run_tiles(todo, config, card):
                manifest.add_batch(batch)
    result = manifest.close(time.monotonic() - start, config.max_error_rate)
    echo(result.summary())
    return result


def _init_ray(config: PredictConfig) -> None:
    import ray

    from segray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(address=config.ray_address)


# --- the tile pipeline -------------------------------------------------------------------------


def footprint_options(config: PredictConfig, card: ModelCard) -> dict[str, Any] | None:
    """What the writers need to vectorise the ``footprints`` class (None when off)."""
    if config.footprints is None:
        return None
    return {"class_index": config.footprints, "name": card.names()[config.footprints]}


def _run_tiles(
    todo: list[tuple[str, str]], config: PredictConfig, card: ModelCard
) -> Iterable[dict]:
    import ray.data

    items = [{"input_uri": i, "output_uri": o} for i, o in todo]
    blocks = max(1, math.ceil(len(items) / config.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    io = {"endpoint": config.endpoint, "threads": config.io_threads}
    cpus = config.cpus_per_task
    read = {**io, "bands": config.bands}
    ds = ds.map_batches(stages.read_tiles, batch_size=None, fn_kwargs=read, num_cpus=cpus)
    ds = _predict_stage(ds, config, emit="mask")
    write = {**io, "footprints": footprint_options(config, card)}
    ds = ds.map_batches(stages.write_masks, batch_size=None, fn_kwargs=write, num_cpus=cpus)
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def _run_scenes(
    todo: list[tuple[str, str]], config: PredictConfig, card: ModelCard
) -> Iterable[dict[str, Any]]:
    """Windows of every scene through the same Predictor; the driver stitches and writes scenes.

    Ray Data keeps the windows in order here, so the driver holds the row bands of about one
    scene at a time (see :class:`segray.tiling.SceneStitcher`).
    """
    import ray.data

    window = scene_window(config, card)
    items = [{"input_uri": i, "output_uri": o} for i, o in todo]
    io = {"bands": config.bands, "endpoint": config.endpoint}
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        geometry = {"window": window, "overlap": config.overlap}
        cpus = config.cpus_per_task
        ds = ds.flat_map(stages.expand_scene, fn_kwargs={**geometry, **io}, num_cpus=cpus)
        ds = ds.map_batches(
            stages.read_windows, batch_size=config.batch_size, fn_kwargs=io, num_cpus=cpus
        )
        ds = _predict_stage(ds, config, emit="logits")
        assembler = stages.SceneAssembler(
            card,
            (window, config.overlap, config.blend),
            render_options(config),
            endpoint=config.endpoint,
            uncertainty=config.mc_samples > 0,
            footprints=footprint_options(config, card),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield from assembler.add_batch(batch)
    finally:
        ctx.execution_options.preserve_order = saved


def scene_window(config: PredictConfig, card: ModelCard) -> tuple[int, int]:
    """The scene window: ``config.window`` square, else the model's own input size."""
    window = (config.window, config.window) if config.window else tuple(card.input_shape[:2])
    if not 0 <= config.overlap < min(window):
        raise ValueError(f"overlap must be smaller than the window {window}; got {config.overlap}")
    return window


def render_options(config: PredictConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`segray.inference.render` a job asks for."""
    return {
        "output": config.output_mode,
        "class_index": config.class_index,
        "threshold": config.threshold,
    }


def _predict_stage(ds: ray.data.Dataset, config: PredictConfig, emit: str) -> ray.data.Dataset:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        Predictor,
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
        fn_constructor_kwargs={
            "model": config.model,
            "endpoint": config.endpoint,
            "render": render_options(config),
            "emit": emit,
            "batch_size": config.batch_size,
            "overlap": config.overlap,
            "blend": config.blend,
            "mc_samples": config.mc_samples,
            "footprints": config.footprints is not None,
        },
    )


class Predictor:
    """Ray Data callable class: loads the model once, then predicts batches of decoded rows.

    Arrays of the model's input size go to the model as they are, grouped by shape. Other sizes
    (odd tiles, scene windows of another size) are cut into model-sized windows and stitched back
    by :func:`segray.tiling.cut_windows` / :func:`segray.tiling.join_windows`, as Serve does.
    ``emit="mask"`` replaces each row's pixels by its uint8 mask and adds per-class pixel
    fractions (and, when asked, the ``uncertainty`` map and the class-id ``labels`` for
    footprints, as uint8 bytes of the mask's shape); ``emit="logits"`` by its float32 logits, for
    scenes to be stitched (with Monte-Carlo samples, the uncertainty is their last channel).
    """

    def __init__(
        self,
        model: str,
        endpoint: str | None = None,
        render: dict[str, Any] | None = None,
        emit: str = "mask",
        batch_size: int = 16,
        overlap: int = tiling.OVERLAP,
        blend: str = tiling.BLEND,
        mc_samples: int = 0,
        footprints: bool = False,
    ) -> None:
        from segray.models import set_monte_carlo

        self.model, self.card = inference.load(model, endpoint=endpoint)
        self.render = render or {"output": "classes", "class_index": 1, "threshold": None}
        self.emit, self.batch_size = emit, batch_size
        self.overlap, self.blend = overlap, blend
        self.mc_samples, self.footprints = mc_samples, footprints
        if mc_samples:  # once: every switch recompiles the model's predict function
            set_monte_carlo(self.model, True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict every row without an error; rows that fail here get one."""
        start = time.perf_counter()
        errors = [str(e) for e in batch["error"]]
        logits = self._logits(self._prepare(batch, errors), batch["input_uri"], errors)
        n, k = len(errors), self.card.num_classes
        fractions = np.full((n, k), np.nan)
        packed = [(b"", [0, 0, 0], "uint8")] * n
        side = {name: [b""] * n for name in self._side_columns()}
        for i, out in self._outputs(logits).items():
            packed[i], fractions[i] = pack(out["mask"]), out["fractions"]
            for name in side:
                side[name][i] = out[name].tobytes()
        share = (time.perf_counter() - start) / max(1, n)
        return {
            **batch,
            "error": np.asarray(errors, dtype=object),
            "seconds": np.asarray(batch["seconds"], np.float64) + share,
            "pixels": _objects([p[0] for p in packed]),
            "shape": np.asarray([[*p[1], 0, 0, 0][:3] for p in packed]),
            "dtype": np.asarray([p[2] for p in packed], dtype=object),
            "class_fractions": fractions,
            **{name: _objects(values) for name, values in side.items()},
        }

    def _side_columns(self) -> list[str]:
        wanted = {"uncertainty": self.mc_samples > 0, "labels": self.footprints}
        return [name for name, on in wanted.items() if on and self.emit == "mask"]

    def _prepare(self, batch: dict[str, np.ndarray], errors: list[str]) -> dict[int, np.ndarray]:
        prepared = {}
        for i, uri in enumerate(batch["input_uri"]):
            if errors[i]:
                continue
            array = unpack(batch["pixels"][i], batch["shape"][i], batch["dtype"][i])
            try:
                prepared[i] = inference.prepare(Tile(array=array, source=str(uri)), self.card)
            except TileError as exc:
                errors[i] = str(exc)
        return prepared

    def _logits(
        self, prepared: dict[int, np.ndarray], uris: np.ndarray, errors: list[str]
    ) -> dict[int, np.ndarray]:
        """Logits (h, w, K) per row (K + 1 with the uncertainty), windows of all rows batched."""
        results = tiling.infer_images(
            self.model,
            list(prepared.values()),
            self.card,
            self.overlap,
            self.blend,
            self.batch_size,
            self.mc_samples,
        )
        out = {}
        for i, result in zip(prepared, results, strict=True):
            if isinstance(result, Exception):
                errors[i] = f"{uris[i]}: inference failed: {type(result).__name__}: {result}"
            else:
                out[i] = result
        return out

    def _outputs(self, logits: dict[int, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """``{row: {"mask", "fractions", ...side columns}}``, rendered a shape group at a time."""
        k = self.card.num_classes
        if self.emit == "logits":  # scenes: the driver renders the stitched logits
            nan = np.full(k, np.nan)
            return {
                i: {"mask": one.astype(np.float32), "fractions": nan} for i, one in logits.items()
            }
        groups: dict[tuple, list[int]] = {}
        for i, one in logits.items():
            groups.setdefault(one.shape, []).append(i)
        out: dict[int, dict[str, np.ndarray]] = {}
        for rows in groups.values():
            stack = np.stack([logits[i] for i in rows])
            uncertainty = None
            if self.mc_samples:
                stack, uncertainty = stack[..., :-1], inference.render_uncertainty(stack[..., -1])
            masks, labels = inference.render_outputs(stack, self.card, **self.render)
            for j, i in enumerate(rows):
                fractions = np.asarray(inference.class_fractions(labels[j], k))
                out[i] = {"mask": masks[j], "fractions": fractions, "labels": labels[j]}
                if uncertainty is not None:
                    out[i]["uncertainty"] = uncertainty[j]
        return out


def _objects(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
