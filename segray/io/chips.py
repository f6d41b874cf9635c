"""The ``scenes`` layout: large scenes cut into chips by windowed reads, never whole in memory.

``root/images/`` holds scenes of any size (GeoTIFF or COG, local or s3://). Each scene's labels are
``root/labels/<scene stem>`` + one of ``.tif .tiff`` (a class-id raster on any grid, reprojected
nearest-neighbour to the scene's grid window by window) or ``.geojson .json .fgb .gpkg`` (polygons
in any CRS); or ``DatasetSpec.labels`` names one vector file for every scene. Only the features
meeting a chip are rasterised (:class:`segray.io.vectors.SceneLabels`).

Validation is held out by whole scenes (``val_split="scenes"``) or by square blocks of every scene
(``"blocks"``); training chips are drawn at random, anew each epoch from ``(seed, epoch, k)``, and
never meet a held-out block or scene, so no validation pixel is ever trained on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.errors import DatasetError, TileError
from segray.io import rasters, storage, vectors

if TYPE_CHECKING:
    from segray.io.labels import DatasetSpec

log = logging.getLogger(__name__)

SCENE_SUFFIXES = (".tif", ".tiff")
LABEL_SUFFIXES = SCENE_SUFFIXES + vectors.VECTOR_SUFFIXES
#: A training chip whose valid pixels are fewer than this share is drawn again.
MIN_VALID = 0.5
#: Draws of a training chip before the last one is taken whatever it holds.
MAX_DRAWS = 20


@dataclass(frozen=True)
class ChipScene:
    """A scene's header and where its labels are (``labels``: a raster's URI, or ``vector``)."""

    id: str
    image: str
    width: int
    height: int
    crs: str | None
    transform: tuple[float, ...] | None
    labels: str | None = None
    vector: vectors.SceneLabels | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Chip:
    """A window of scene ``scene`` (index), ``size`` square, at (col, row)."""

    scene: int
    col: int
    row: int
    weight: float = 1.0


@dataclass
class ChipSplit:
    """The scenes, the held-out rectangles per scene (col, row, width, height), the validation
    chips (a fixed grid over them) and the scenes training draws from."""

    scenes: list[ChipScene]
    size: int
    held_out: dict[int, list[tuple[int, int, int, int]]]
    val_chips: list[Chip]
    train_scenes: list[int]

    def allowed(self, chip: Chip) -> bool:
        """Whether a training chip keeps clear of every held-out rectangle of its scene."""
        s = self.size
        for col, row, w, h in self.held_out.get(chip.scene, ()):
            if (
                chip.col < col + w
                and col < chip.col + s
                and chip.row < row + h
                and row < chip.row + s
            ):
                return False
        return True


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def find_scenes(spec: DatasetSpec) -> list[ChipScene]:
    """List the scenes and their labels and read their headers (no pixel); every problem of every
    scene is collected and raised at once as a :class:`DatasetError` naming the files."""
    ep = spec.endpoint
    images_dir = storage.join(spec.root, "images")
    images = storage.list_files(images_dir, suffixes=SCENE_SUFFIXES, endpoint=ep)
    if not images:
        raise DatasetError(
            f"no scenes under {images_dir} (expected .tif/.tiff for layout 'scenes')"
        )
    images = images[: spec.limit] if spec.limit else images
    label_files: dict[str, str] = {}
    if not spec.labels:
        label_dir = storage.join(spec.root, "labels")
        for uri in storage.list_files(label_dir, suffixes=LABEL_SUFFIXES, endpoint=ep):
            if _stem(uri) in label_files:
                raise DatasetError(
                    f"two label files for scene {_stem(uri)!r}: {uri}, {label_files[_stem(uri)]}"
                )
            label_files[_stem(uri)] = uri
    shared = (
        vectors.read_features(spec.labels, class_field=spec.class_field, endpoint=ep)
        if spec.labels
        else None
    )
    scenes, errors, empty = [], [], []
    for uri in images:
        try:
            scene = _scene(uri, spec, label_files.get(_stem(uri)), shared)
        except (DatasetError, TileError, storage.StorageError) as exc:
            errors.append(str(exc))
            continue
        if scene.vector is not None and not len(scene.vector):
            if shared is None:
                errors.append(
                    f"{scene.labels}: its labels cover none of scene {uri} ({_crs_note(scene)})"
                )
                continue
            empty.append(uri)
        scenes.append(scene)
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError(f"{len(errors)} bad scene(s) under {spec.root}:\n  {shown}{more}")
    if shared is not None and len(empty) == len(scenes):
        raise DatasetError(f"{spec.labels}: its labels cover none of the {len(scenes)} scene(s)")
    if empty:
        log.warning(
            "%s has no label on %d scene(s): %s", spec.labels, len(empty), ", ".join(empty[:5])
        )
    return scenes


def _crs_note(scene: ChipScene) -> str:
    return f"scene CRS {scene.crs or 'none'}; a GeoJSON without a crs member is WGS84"


def _scene(
    uri: str, spec: DatasetSpec, label_uri: str | None, shared: vectors.Features | None
) -> ChipScene:
    with rasters.open_scene(uri, endpoint=spec.endpoint) as ds:
        rasters.check_scene(ds, uri, spec.bands)
        width, height = ds.width, ds.height
        crs = ds.crs.to_string() if ds.crs else None
        transform = tuple(ds.transform)[:6] if ds.crs or not ds.transform.is_identity else None
    size = spec.size[0] if spec.size else 0
    if min(width, height) < size:
        raise DatasetError(f"{uri}: scene is {width}x{height}, smaller than chips of {size} px")
    base = ChipScene(_stem(uri), uri, width, height, crs, transform)
    affine = _affine(transform)
    if shared is not None:
        return _with(base, vector=vectors.for_scene(shared, crs, affine, width, height))
    if label_uri is None:
        raise DatasetError(
            f"{uri}: no labels for this scene (expected labels/{base.id}.tif, .geojson, "
            ".fgb or .gpkg, or --labels)"
        )
    if label_uri.endswith(vectors.VECTOR_SUFFIXES):
        features = vectors.read_features(
            label_uri, class_field=spec.class_field, endpoint=spec.endpoint
        )
        return _with(
            base, labels=label_uri, vector=vectors.for_scene(features, crs, affine, width, height)
        )
    _check_label_raster(label_uri, base, spec)
    return _with(base, labels=label_uri)


def _with(scene: ChipScene, **changes: Any) -> ChipScene:
    from dataclasses import replace

    return replace(scene, **changes)


def _affine(transform: tuple[float, ...] | None) -> Any:
    from affine import Affine

    return Affine(*transform) if transform is not None else None


def _check_label_raster(uri: str, scene: ChipScene, spec: DatasetSpec) -> None:
    from rasterio.warp import transform_bounds

    with rasters.open_scene(uri, endpoint=spec.endpoint) as ds:
        if ds.crs is None or scene.crs is None:
            if (ds.width, ds.height) != (scene.width, scene.height):
                raise DatasetError(
                    f"{uri}: labels are {ds.width}x{ds.height} without a CRS to place them, but "
                    f"scene {scene.image} is {scene.width}x{scene.height}"
                )
            return
        left, bottom, right, top = transform_bounds(ds.crs, scene.crs, *ds.bounds)
        a, b, c, d, e, f = scene.transform or (1, 0, 0, 0, 1, 0)
        corners = [(0, 0), (scene.width, scene.height)]
        xs = [a * col + b * row + c for col, row in corners]
        ys = [d * col + e * row + f for col, row in corners]
        if right <= min(xs) or left >= max(xs) or top <= min(ys) or bottom >= max(ys):
            raise DatasetError(
                f"{uri}: its labels cover none of scene {scene.image} ({_crs_note(scene)})"
            )


def split(scenes: list[ChipScene], spec: DatasetSpec) -> ChipSplit:
    """Hold out whole scenes or blocks of every scene (seeded) and lay the validation grid."""
    size = spec.size[0] if spec.size else 0
    rng = np.random.default_rng(spec.seed)
    held: dict[int, list[tuple[int, int, int, int]]] = {}
    if spec.val_fraction <= 0:
        return ChipSplit(scenes, size, {}, [], list(range(len(scenes))))
    if spec.val_split == "scenes":
        if len(scenes) < 2:
            raise DatasetError(
                "--val-split scenes needs two scenes or more; use --val-split blocks"
            )
        n = min(max(1, round(len(scenes) * spec.val_fraction)), len(scenes) - 1)
        for i in sorted(rng.permutation(len(scenes))[:n].tolist()):
            held[i] = [(0, 0, scenes[i].width, scenes[i].height)]
        train = [i for i in range(len(scenes)) if i not in held]
    else:
        block = spec.block_size or 4 * size
        block = max(size, block - block % size)
        cells = [
            (i, col, row, min(block, s.width - col), min(block, s.height - row))
            for i, s in enumerate(scenes)
            for row in range(0, s.height - size + 1, block)
            for col in range(0, s.width - size + 1, block)
        ]
        if len(cells) < 2:
            raise DatasetError(
                f"scenes hold {len(cells)} block(s) of {block} px; lower --block-size"
            )
        n = min(max(1, round(len(cells) * spec.val_fraction)), len(cells) - 1)
        for j in sorted(rng.permutation(len(cells))[:n].tolist()):
            i, *rect = cells[j]
            held.setdefault(i, []).append(tuple(rect))
        train = list(range(len(scenes)))
    val = [
        Chip(i, c, r)
        for i, rects in sorted(held.items())
        for col, row, w, h in rects
        for r in _grid(row, h, size)
        for c in _grid(col, w, size)
    ]
    return ChipSplit(scenes, size, held, val, train)


def _grid(start: int, length: int, size: int) -> list[int]:
    """Chip origins covering [start, start + length) without leaving it (the last one flush)."""
    if length < size:
        return []
    origins = list(range(start, start + length - size + 1, size))
    if origins[-1] + size < start + length:
        origins.append(start + length - size)
    return origins


def draw(plan: ChipSplit, rng: np.random.Generator, positive_fraction: float) -> Chip:
    """One training chip: a scene by its area, a window clear of held-out blocks; with
    ``positive_fraction`` odds, a window around a point of a random labelled feature."""
    scenes, size = plan.scenes, plan.size
    areas = np.array([scenes[i].width * scenes[i].height for i in plan.train_scenes], float)
    chip = Chip(0, 0, 0)
    for _ in range(200):
        i = plan.train_scenes[int(rng.choice(len(areas), p=areas / areas.sum()))]
        scene = scenes[i]
        col, row = _origin(scene, size, rng, positive_fraction)
        chip = Chip(i, col, row)
        if plan.allowed(chip):
            return chip
    raise DatasetError("no training chip keeps clear of the held-out blocks; lower --val-fraction")


def _origin(
    scene: ChipScene, size: int, rng: np.random.Generator, positive: float
) -> tuple[int, int]:
    hi_col, hi_row = scene.width - size, scene.height - size
    vector = scene.vector
    if vector is not None and len(vector) and rng.random() < positive:
        minx, miny, maxx, maxy = vector.geometries[int(rng.integers(len(vector)))].bounds
        x, y = rng.uniform(minx, max(maxx, minx + 1)), rng.uniform(miny, max(maxy, miny + 1))
        col, row = int(x) - int(rng.integers(size)), int(y) - int(rng.integers(size))
        return int(np.clip(col, 0, hi_col)), int(np.clip(row, 0, hi_row))
    return int(rng.integers(hi_col + 1)), int(rng.integers(hi_row + 1))


_OPEN: dict[str, Any] = {}
_STACK = contextlib.ExitStack()


def _opened(uri: str, endpoint: str | None) -> Any:
    """An open dataset per URI in this process, the last few kept for the next chip."""
    if uri not in _OPEN:
        if len(_OPEN) >= 16:
            _STACK.close()
            _OPEN.clear()
        _OPEN[uri] = _STACK.enter_context(rasters.open_scene(uri, endpoint=endpoint))
    return _OPEN[uri]


def read_chip(scene: ChipScene, chip: Chip, size: int, spec: DatasetSpec) -> dict[str, Any]:
    """``{"id", "image", "mask", "valid"}`` of one chip by windowed reads; no-data pixels are
    labelled ``spec.ignore_index``. A :class:`TileError` names the file at fault."""
    from segray.io import bands as band_ops
    from segray.io.imagery import Tile

    window = rasters.Window(chip.row, chip.col, size, size)
    try:
        ds = _opened(scene.image, spec.endpoint)
        pixels, valid = rasters.read_window(ds, window, spec.bands)
        nodata = ds.nodata
    except Exception as exc:
        _OPEN.pop(scene.image, None)
        raise TileError(
            scene.image, f"cannot read window at ({chip.col}, {chip.row}): {exc}", "unreadable"
        ) from exc
    tile = band_ops.apply_nodata(Tile(pixels, valid=valid, meta={"nodata": nodata}), spec.nodata)
    mask = _labels(scene, chip, size, spec)
    ids = np.unique(mask)
    bad = ids[(ids >= (spec.num_classes or 256)) & (ids != spec.ignore_index)]
    if bad.size:
        raise TileError(
            scene.labels or spec.labels or scene.image,
            f"class id {int(bad.max())} found but classes is {spec.num_classes}; raise --classes",
            "labels",
        )
    valid = np.ones(mask.shape, bool) if tile.valid is None else tile.valid
    mask = np.where(valid, mask, np.uint8(spec.ignore_index)).astype(np.uint8)
    return {
        "id": f"{scene.id}@{chip.col},{chip.row}",
        "image": tile.array,
        "mask": mask,
        "valid": valid,
    }


def _labels(scene: ChipScene, chip: Chip, size: int, spec: DatasetSpec) -> np.ndarray:
    if scene.vector is not None:
        return scene.vector.rasterize(chip.col, chip.row, size, size)
    assert scene.labels is not None
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window as RioWindow

    window = RioWindow(chip.col, chip.row, size, size)
    try:
        ds = _opened(scene.labels, spec.endpoint)
        same = (
            ds.crs is None
            or scene.crs is None
            or (
                ds.crs.to_string() == scene.crs
                and tuple(ds.transform)[:6] == scene.transform
                and (ds.width, ds.height) == (scene.width, scene.height)
            )
        )
        if same:
            return ds.read(1, window=window).astype(np.uint8)
        with WarpedVRT(
            ds, crs=scene.crs, transform=_affine(scene.transform), width=scene.width,
            height=scene.height, resampling=Resampling.nearest, nodata=spec.ignore_index,
        ) as vrt:  # fmt: skip
            return vrt.read(1, window=window).astype(np.uint8)
    except Exception as exc:
        _OPEN.pop(scene.labels, None)
        raise TileError(
            scene.labels, f"cannot read labels at ({chip.col}, {chip.row}): {exc}", "labels"
        ) from exc
