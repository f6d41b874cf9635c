"""The ``scenes`` layout: large scenes cut into chips by windowed reads, never whole in memory.

``root/images/`` holds scenes of any size (GeoTIFF or COG, local or s3://). Each scene's labels are
``root/labels/<scene stem>`` + one of ``.tif .tiff`` (a class-id raster on any grid, reprojected
nearest-neighbour to the scene's grid window by window) or ``.geojson .json .fgb .gpkg`` (polygons
in any CRS); or ``DatasetSpec.labels`` names one vector file for every scene. With
``DatasetSpec.stac`` the scenes are a STAC file's items (asset ``asset``) and their labels the
items' ``labels`` assets. Only the features meeting a chip are rasterised
(:class:`segray.io.vectors.SceneLabels`). Which chips are read is :mod:`segray.datasets.sampling`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.datasets.scene import Chip, ChipScene
from segray.errors import DatasetError, TileError
from segray.io import gdal, rasters, storage, vectors
from segray.io.files import FileSystem
from segray.io.readers import Grid, RasterHeader, RasterReader, open_reader

if TYPE_CHECKING:
    from segray.datasets.labels import DatasetSpec

log = logging.getLogger(__name__)

SCENE_SUFFIXES = (".tif", ".tiff")
LABEL_SUFFIXES = SCENE_SUFFIXES + vectors.VECTOR_SUFFIXES
#: A training chip whose valid pixels are fewer than this share is drawn again.
MIN_VALID = 0.5
#: Draws of a training chip before the last one is taken whatever it holds.
MAX_DRAWS = 20


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def find_scenes(spec: DatasetSpec) -> list[ChipScene]:
    """List the scenes and their labels and read their headers (no pixel); every problem of every
    scene is collected and raised at once as a :class:`DatasetError` naming the files."""
    listed, errors = _from_stac(spec) if spec.stac else _from_folders(spec)
    shared = (
        vectors.read_features(spec.labels, spec.fs(spec.labels), class_field=spec.class_field)
        if spec.labels
        else None
    )
    scenes, empty = [], []
    for name, uri, label_uri in listed[: spec.limit] if spec.limit else listed:
        try:
            scene = _scene(name, uri, spec, label_uri, shared)
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
        where = spec.stac or spec.root
        raise DatasetError(f"{len(errors)} bad scene(s) in {where}:\n  {shown}{more}")
    if shared is not None and len(empty) == len(scenes):
        raise DatasetError(f"{spec.labels}: its labels cover none of the {len(scenes)} scene(s)")
    if empty:
        log.warning(
            "%s has no label on %d scene(s): %s", spec.labels, len(empty), ", ".join(empty[:5])
        )
    return scenes


Listed = list[tuple[str, str, str | None]]  # (scene id, image URI, labels URI or None)


def _from_folders(spec: DatasetSpec) -> tuple[Listed, list[str]]:
    """The scenes of ``images/`` with their files of ``labels/`` (none with ``spec.labels``)."""
    images_dir = storage.join(spec.root, "images")
    images = spec.fs(images_dir).list_files(images_dir, suffixes=SCENE_SUFFIXES)
    if not images:
        raise DatasetError(f"no scenes under {images_dir} (.tif or .tiff for layout 'scenes')")
    found: dict[str, str] = {}
    if not spec.labels:
        label_dir = storage.join(spec.root, "labels")
        for uri in spec.fs(label_dir).list_files(label_dir, suffixes=LABEL_SUFFIXES):
            if _stem(uri) in found:
                raise DatasetError(
                    f"two label files for scene {_stem(uri)!r}: {uri}, {found[_stem(uri)]}"
                )
            found[_stem(uri)] = uri
    return [(_stem(uri), uri, found.get(_stem(uri))) for uri in images], []


def _from_stac(spec: DatasetSpec) -> tuple[Listed, list[str]]:
    """The scenes of the STAC items (asset ``spec.asset``) with their labels assets."""
    from segray.io import stac

    listed, errors = [], []
    for item in stac.read_items(spec.stac or "", spec.fs(spec.stac or "")):
        try:
            labels = None if spec.labels else item.label_asset()
            if labels is None and not spec.labels:
                raise DatasetError(
                    f"STAC item {item.id!r} ({item.href}) has no labels asset (role 'labels'); "
                    "give --labels"
                )
            listed.append((stac.safe_name(item.id), item.asset(spec.asset), labels))
        except DatasetError as exc:
            errors.append(str(exc))
    if not listed and not errors:
        raise DatasetError(f"{spec.stac}: no STAC item to train on")
    return listed, errors


def _crs_note(scene: ChipScene) -> str:
    return f"scene CRS {scene.crs or 'none'}; a GeoJSON without a crs member is WGS84"


def _scene(
    name: str, uri: str, spec: DatasetSpec, label_uri: str | None, shared: vectors.Features | None
) -> ChipScene:
    head = _header(uri, spec)
    rasters.check_scene(head, spec.bands)
    width, height, crs = head.width, head.height, head.crs
    transform = _placement(head)
    size = spec.size[0] if spec.size else 0
    if min(width, height) < size:
        raise DatasetError(f"{uri}: scene is {width}x{height}, smaller than chips of {size} px")
    base = ChipScene(name, uri, width, height, crs, transform)
    affine = _affine(transform)
    if shared is not None:
        return _with(base, vector=vectors.for_scene(shared, crs, affine, width, height))
    if label_uri is None:
        raise DatasetError(
            f"{uri}: no labels for this scene (expected labels/{name}.tif, .geojson, .fgb or "
            ".gpkg, a STAC labels asset, or --labels)"
        )
    if label_uri.endswith(vectors.VECTOR_SUFFIXES):
        features = vectors.read_features(
            label_uri, spec.fs(label_uri), class_field=spec.class_field
        )
        return _with(
            base, labels=label_uri, vector=vectors.for_scene(features, crs, affine, width, height)
        )
    _check_label_raster(label_uri, base, spec)
    return _with(base, labels=label_uri)


def _header(uri: str, spec: DatasetSpec) -> RasterHeader:
    with open_reader(uri, spec.fs(uri)) as reader:
        return reader.header()


def _placement(head: RasterHeader) -> tuple[float, ...] | None:
    """The transform as six numbers; a CRS without a transform is placed by the identity."""
    if head.transform is not None:
        return tuple(head.transform)[:6]
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) if head.crs else None


def _with(scene: ChipScene, **changes: Any) -> ChipScene:
    from dataclasses import replace

    return replace(scene, **changes)


def _affine(transform: tuple[float, ...] | None) -> Any:
    from affine import Affine

    return Affine(*transform) if transform is not None else None


def _check_label_raster(uri: str, scene: ChipScene, spec: DatasetSpec) -> None:
    from affine import Affine
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    head = _header(uri, spec)
    if head.crs is None or scene.crs is None:
        if (head.width, head.height) != (scene.width, scene.height):
            raise DatasetError(
                f"{uri}: labels are {head.width}x{head.height} without a CRS to place them, but "
                f"scene {scene.image} is {scene.width}x{scene.height}"
            )
        return
    bounds = array_bounds(head.height, head.width, head.transform or Affine.identity())
    left, bottom, right, top = transform_bounds(head.crs, scene.crs, *bounds)
    a, b, c, d, e, f = scene.transform or (1, 0, 0, 0, 1, 0)
    corners = [(0, 0), (scene.width, scene.height)]
    xs = [a * col + b * row + c for col, row in corners]
    ys = [d * col + e * row + f for col, row in corners]
    if right <= min(xs) or left >= max(xs) or top <= min(ys) or bottom >= max(ys):
        raise DatasetError(
            f"{uri}: its labels cover none of scene {scene.image} ({_crs_note(scene)})"
        )


_OPEN: dict[str, Any] = {}
_STACK = contextlib.ExitStack()
_ENV: list[Any] = []  # the process's GDAL environment, once entered
#: GDAL's block cache in a chip-reading process (its default, 5 % of RAM, keeps whole scenes).
CACHE_MIB = 64


def _opened(uri: str, fs: FileSystem) -> RasterReader:
    """A reader per URI in this process, the last few kept open for the next chip, under one
    GDAL environment with a bounded block cache."""
    if not _ENV:
        _ENV.append(gdal.env(GDAL_CACHEMAX=CACHE_MIB))
        _ENV[0].__enter__()
        atexit.register(close_all)
    if uri not in _OPEN:
        if len(_OPEN) >= 16:
            _STACK.close()
            _OPEN.clear()
        _OPEN[uri] = _STACK.enter_context(open_reader(uri, fs))
    return _OPEN[uri]


def close_all() -> None:
    """Close this process's open scenes and leave its GDAL environment (at exit: before the
    interpreter tears down what rasterio needs to)."""
    _STACK.close()
    _OPEN.clear()
    while _ENV:
        _ENV.pop().__exit__(None, None, None)


def read_chip(scene: ChipScene, chip: Chip, size: int, spec: DatasetSpec) -> dict[str, Any]:
    """``{"id", "image", "mask", "valid"}`` of one chip by windowed reads; no-data pixels are
    labelled ``spec.ignore_index``. A :class:`TileError` names the file at fault."""
    from segray.io import bands as band_ops
    from segray.io.imagery import Tile

    window = rasters.Window(chip.row, chip.col, size, size)
    try:
        read = _opened(scene.image, spec.fs(scene.image)).read(window, bands=spec.bands)
        pixels, valid, nodata = read.array, read.valid, read.meta["nodata"]
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
    window = rasters.Window(chip.row, chip.col, size, size)
    try:
        reader = _opened(scene.labels, spec.fs(scene.labels))
        head = reader.header()
        same = (
            head.crs is None
            or scene.crs is None
            or (
                head.crs == scene.crs
                and _placement(head) == scene.transform
                and (head.width, head.height) == (scene.width, scene.height)
            )
        )
        grid = None
        if not same:  # onto the scene's grid, by nearest neighbour: class ids stay ids
            grid = Grid(scene.crs, _affine(scene.transform), scene.width, scene.height)
        read = reader.read(window, bands=(1,), grid=grid, fill=spec.ignore_index)
        return read.array[..., 0].astype(np.uint8)
    except Exception as exc:
        _OPEN.pop(scene.labels, None)
        raise TileError(
            scene.labels, f"cannot read labels at ({chip.col}, {chip.row}): {exc}", "labels"
        ) from exc
