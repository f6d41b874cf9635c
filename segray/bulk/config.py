"""The settings of one bulk prediction job: every field once, with its default, help and check."""

from __future__ import annotations

import re

from pydantic import field_validator, model_validator

from segray.inference.onnx import RUNTIME_HELP, Runtime
from segray.inference.render import Output
from segray.inference.run import BATCH_SIZE
from segray.inference.tiling import BLEND, OVERLAP, Blend, default_overlap
from segray.inference.tta import HELP as TTA_HELP
from segray.inference.tta import TTA
from segray.io import storage
from segray.io.footprints import NATIVE, WGS84
from segray.models.precision import Precision
from segray.settings import Settings, setting


class PredictConfig(Settings, storage.Addressed):
    """Settings of one bulk prediction job; the defaults run on a laptop CPU.

    Inputs are ``input`` (a folder, s3:// prefix or one file) filtered by ``suffixes`` and
    ``pattern``, or the URIs listed by ``manifest`` (a Parquet file with an ``input_uri`` or
    ``uri`` column, or text with one URI a line), whose relative paths then start at ``input``,
    or the ``asset`` of every item of a STAC file (``stac``; masks then named by item id).
    Masks go to ``output/<relative path>`` (``.tif`` for TIFF inputs, else ``.png``), the
    manifest of each run to ``output/_manifest/run-<time>-<id>/``; with ``stac_items`` a STAC
    item beside each mask (``x.json``) and ``output/collection.json`` over them.
    """

    model: str = setting(help="Run folder, model folder or .keras file (local or s3://).")
    input: str = setting("", "Folder or s3:// prefix of tiles (or one file).")
    output: str = setting(help="Folder or s3:// prefix for the masks.")
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")
    manifest: str | None = setting(None, "Parquet or text list of input URIs.")
    stac: str | None = setting(
        None, "STAC ItemCollection, catalog or collection whose items' assets are the inputs."
    )
    asset: str | None = setting(
        None, "Asset key of the STAC items (default: each item's one raster asset)."
    )
    pattern: str | None = setting(None, "Glob on the relative path or file name.")
    suffixes: tuple[str, ...] | None = setting(None, "Input suffixes, e.g. .tif,.png.")
    batch_size: int = setting(BATCH_SIZE, "Windows per model call.", ge=1)
    precision: Precision | None = setting(
        None, "Arithmetic of the model: fp32, bf16 or fp16 (default: the card's, as trained)."
    )
    runtime: Runtime = setting("keras", RUNTIME_HELP)
    tiles_per_call: int | None = setting(
        None,
        "Tiles per Predictor actor call (default: batch_size, so tiles of one window fill "
        "one model call).",
        ge=1,
    )
    tiles_per_task: int = setting(
        64, "Tiles per read or write task (fewer, larger tasks cost less per tile).", ge=1
    )
    concurrency: int = setting(1, "Predictor actors.", ge=1)
    gpus_per_actor: float = setting(0.0, "GPUs each Predictor actor holds.", ge=0)
    cpus_per_actor: float = setting(1.0, "CPUs each Predictor actor holds.", gt=0)
    cpus_per_task: float = setting(0.5, "CPUs each read or write task reserves.", gt=0)
    output_mode: Output = setting("classes", "What the mask holds.")
    class_index: int = setting(1, "Class of binary and probability masks.", ge=0)
    threshold: float | None = setting(
        None, "Probability threshold (default: the card's).", ge=0, le=1
    )
    bands: tuple[int, ...] | None = setting(None, "1-based bands (default: the model card's).")
    nodata: float | None = setting(
        None, "Pixel value that is no data where a file sets none (default: the model card's)."
    )
    overwrite: bool = setting(False, "Redo inputs whose outputs exist.")
    max_error_rate: float = setting(
        0.0, "Share of inputs in error above which the job fails.", ge=0, le=1
    )
    scene: bool = setting(False, "Inputs are large GeoTIFF scenes, read window by window.")
    window: int | None = setting(None, "Scene window in pixels (default: the model's input).", ge=1)
    overlap: int | None = setting(
        None, f"Overlap of windows in pixels (default: {OVERLAP}, at most half the window).", ge=0
    )
    blend: Blend = setting(BLEND, "How overlapping windows are joined.")
    scenes_at_once: int | None = setting(
        None, "Scenes stitched at once, a task each (default: 2 per Predictor actor).", ge=1
    )
    mc_samples: int = setting(
        0, "Monte-Carlo dropout passes; writes <name>.uncertainty.<ext> beside each mask.", ge=0
    )
    tta: TTA = setting("none", TTA_HELP)
    footprints: int | None = setting(
        None, "Class id to vectorise; writes <name>.geojson beside each mask.", ge=0
    )
    footprints_crs: str = setting(
        WGS84, "CRS of the footprints: EPSG:4326 (RFC 7946), native (the tile's) or EPSG:n."
    )
    vectors: str | None = setting(
        None,
        "One vector layer of the job's polygons, merged across seams: .parquet (GeoParquet), "
        ".fgb or .gpkg, local or s3://.",
    )
    vector_classes: tuple[int, ...] | None = setting(
        None, "Class ids in the vector layer (default: every class but 0, the background)."
    )
    vectors_crs: str = setting(
        WGS84, "CRS of the vector layer: EPSG:4326, native (the masks') or EPSG:n."
    )
    min_area: float = setting(0.0, "Polygons of fewer pixels are left out of the layer.", ge=0)
    simplify: float = setting(
        0.5, "Tolerance in pixels of the layer's polygons' simplification (0: pixel edges).", ge=0
    )
    opening: int = setting(
        0, "Radius in pixels of an opening of each class before tracing (removes specks).", ge=0
    )
    vector_block: int = setting(
        1024, "Scenes are traced in square blocks of this many pixels.", ge=16, cli=False
    )
    io_threads: int = setting(8, "Threads of each read or write task.", ge=1, cli=False)
    manifest_rows: int = setting(10_000, "Manifest rows per Parquet part.", ge=1, cli=False)
    manifest_flush_s: float = setting(
        30.0, "Seconds after which collected manifest rows are written as a part.", gt=0
    )
    stac_items: bool = setting(
        True, "Write <name>.json (a STAC item) beside each mask, collection.json at the root."
    )
    ray_address: str | None = setting(None, "Ray cluster (default: RAY_ADDRESS, else local).")
    pool: str | None = setting(
        None,
        "A named Predictor pool on the cluster (segray pool start) instead of the job's own "
        "actors: no model load, no Keras import in the job.",
    )

    def overlap_for(self, window: tuple[int, int] | None) -> int:
        """The overlap of windows of this size: ``overlap``, else the default for the size
        (:func:`segray.inference.tiling.default_overlap`; :data:`OVERLAP` for any size)."""
        if self.overlap is not None:
            return self.overlap
        return OVERLAP if window is None else default_overlap(window)

    def actor_batch(self) -> int:
        """Tiles per Predictor actor call: ``tiles_per_call``, else ``batch_size``."""
        return self.tiles_per_call or self.batch_size

    @field_validator("suffixes")
    @classmethod
    def _lower(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return tuple(s.lower() for s in value) if value else None

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str | None) -> str | None:
        return checked_pool_name(value)

    @field_validator("vectors")
    @classmethod
    def _layer_format(cls, value: str | None) -> str | None:
        if value is not None:
            from segray.io.vectorlayer import layer_format

            layer_format(value)
        return value

    @field_validator("footprints_crs", "vectors_crs")
    @classmethod
    def _known_crs(cls, value: str) -> str:
        if value == NATIVE:
            return value
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        try:
            return CRS.from_user_input(value).to_string()
        except CRSError as exc:
            raise ValueError(f"not a CRS rasterio knows, nor 'native': {exc}") from None

    @model_validator(mode="after")
    def _fits(self) -> PredictConfig:
        if self.stac and (self.input or self.manifest):
            raise ValueError("stac replaces input and manifest: give the STAC file, or those")
        if self.asset is not None and not self.stac:
            raise ValueError("asset names the asset of STAC items: give stac too")
        if not (self.input or self.manifest or self.stac):
            raise ValueError(
                "give input (a folder or s3:// prefix), manifest (a list of URIs) or stac "
                "(a STAC ItemCollection, catalog or collection)"
            )
        if self.runtime == "onnx" and self.mc_samples:
            raise ValueError("mc_samples needs the dropout of runtime keras; onnx has none")
        if self.window is not None and self.overlap is not None and self.overlap >= self.window:
            raise ValueError(
                f"overlap must lie in 0..window-1 ({self.window - 1}); got {self.overlap}"
            )
        return self


def checked_pool_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError(f"a pool name is 1-64 letters, digits, '_', '.' or '-'; got {value!r}")
    return value


class PoolConfig(Settings, storage.Addressed):
    """A named Predictor pool: ``size`` detached actors that load ``model`` once and predict for
    every job given ``--pool`` (:mod:`segray.bulk.pool`)."""

    model: str = setting(help="Run folder, model folder or .keras file (local or s3://).")
    size: int = setting(1, "Predictor actors of the pool.", ge=1)
    precision: Precision | None = setting(
        None, "Arithmetic of the model: fp32, bf16 or fp16 (default: the card's, as trained)."
    )
    runtime: Runtime = setting("keras", RUNTIME_HELP)
    cpus_per_actor: float = setting(1.0, "CPUs each actor holds.", gt=0)
    gpus_per_actor: float = setting(0.0, "GPUs each actor holds.", ge=0)
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")
    ray_address: str | None = setting(
        None, "A running Ray cluster (default: RAY_ADDRESS, else the one started on this machine)."
    )
