"""Labelled tile collections → Ray Datasets of ``{"id", "image", "mask"}`` rows.

Layouts (``root`` is a local folder or an s3:// prefix):

- ``paired``:   ``images/X.<png|jpg|tif>`` ↔ ``masks/X.<png|tif>`` with class ids as pixel values.
- ``nuclei``:   the Data Science Bowl 2018 layout, ``ID/images/ID.png`` + ``ID/masks/*.png``; the
  binary instance masks are merged into one foreground mask (class 1).
- ``palette``:  like ``paired`` but masks are RGB colours, mapped to class ids by a small JSON
  (``{"palette": [[r, g, b], ...]}``, index = class id; default ``root/classes.json``).
- ``polygons``: ``images/X.png`` + ``labels/X.json``: a JSON list of objects
  (``{"class": 1, "points": [[x, y], ...]}`` or bare vertex lists, class 1) or a GeoJSON
  FeatureCollection (``properties.class``), in pixel coordinates, or in the image's CRS for
  georeferenced images. Rasterised with holes kept.

Pairing is checked on the driver from the listing alone (no pixel is read); pixels are read by Ray
tasks, and every per-file problem is collected and reported at once, naming the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import field_validator

from segray.errors import DatasetError, TileError
from segray.io import bands, gdal, imagery, storage
from segray.io.readers import open_reader
from segray.settings import Settings, setting

if TYPE_CHECKING:
    pass

Layout = Literal["paired", "nuclei", "palette", "polygons", "scenes"]
ValSplit = Literal["blocks", "scenes"]
IMAGE_SUFFIXES = imagery.TILE_SUFFIXES
MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One labelled example before reading: where its image and its labels are."""

    id: str
    image: str
    labels: tuple[str, ...]


class DatasetSpec(Settings, storage.Addressed):
    """Where a labelled collection is and how to read it."""

    root: str = setting(help="Labelled collection: folder or s3:// prefix.")
    layout: Layout = setting("paired", "How images and labels are laid out.")
    num_classes: int | None = setting(None, "Classes, background included; ids >= it are refused.")
    size: tuple[int, int] | None = setting(None, "Resize to (height, width); an int is square.")
    bands: tuple[int, ...] | None = setting(None, "1-based bands to read, e.g. 1,2,3.")
    palette: str | None = setting(None, "Palette JSON for the palette layout.")
    val_fraction: float = setting(0.2, "Share of samples held out for validation.", ge=0, lt=1)
    seed: int = setting(0, "Seed of the train/validation split.")
    endpoint: str | None = setting(None, "S3 endpoint URL.")
    limit: int | None = setting(None, "Use only the first N samples.", ge=1)
    nodata: float | None = setting(None, "Pixel value that is no data where a file sets none.")
    ignore_index: int = setting(255, "Label id that counts for nothing.", ge=0, le=255)
    labels: str | None = setting(None, "One vector file labelling every scene (layout scenes).")
    stac: str | None = setting(None, "STAC ItemCollection, catalog or collection of scenes.")
    asset: str | None = setting(None, "The STAC items' image asset (default: their one image).")
    class_field: str | None = setting(None, "Vector attribute holding class ids (default: 1).")
    val_split: ValSplit = setting("blocks", "Hold out blocks of every scene, or whole scenes.")
    block_size: int | None = setting(None, "Held-out block size in pixels (default 4 chips).")

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value


def _stem(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]


def _by_stem(files: list[str], folder: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for uri in files:
        stem = _stem(uri)
        if stem in out:
            raise DatasetError(f"two files share the name {stem!r} in {folder}: {out[stem]}, {uri}")
        out[stem] = uri
    return out


def _pair(spec: DatasetSpec, labels_dir: str, label_suffixes: tuple[str, ...]) -> list[Sample]:
    images_dir = storage.join(spec.root, "images")
    label_root = storage.join(spec.root, labels_dir)
    images = _by_stem(
        spec.fs(images_dir).list_files(images_dir, suffixes=IMAGE_SUFFIXES), images_dir
    )
    labels = _by_stem(
        spec.fs(label_root).list_files(label_root, suffixes=label_suffixes), label_root
    )
    if not images:
        raise DatasetError(
            f"no images under {images_dir} (expected {', '.join(IMAGE_SUFFIXES)} files for "
            f"layout {spec.layout!r}); check --data and --layout"
        )
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        lines = [
            f"  {images.get(s) or labels[s]} has no {'label' if s in images else 'image'}"
            for s in unpaired[:10]
        ]
        more = f"\n  … and {len(unpaired) - 10} more" if len(unpaired) > 10 else ""
        raise DatasetError(
            f"{len(unpaired)} unpaired files under {spec.root}:\n" + "\n".join(lines) + more
        )
    return [Sample(s, images[s], (labels[s],)) for s in sorted(images)]


def _nuclei(spec: DatasetSpec) -> list[Sample]:
    files = spec.fs(spec.root).list_files(spec.root, suffixes=".png")
    samples: dict[str, dict[str, Any]] = {}
    for uri in files:
        parts = storage.relative_to(spec.root, uri).split("/")
        if len(parts) != 3 or parts[1] not in ("images", "masks"):
            continue
        entry = samples.setdefault(parts[0], {"images": [], "masks": []})
        entry[parts[1]].append(uri)
    if not samples:
        raise DatasetError(f"no ID/images/ID.png files under {spec.root} for layout 'nuclei'")
    bad = [sid for sid, e in samples.items() if len(e["images"]) != 1 or not e["masks"]]
    if bad:
        raise DatasetError(
            "nuclei layout needs exactly one image and at least one mask per ID; broken: "
            + ", ".join(storage.join(spec.root, b) for b in sorted(bad)[:10])
        )
    return [
        Sample(s, e["images"][0], tuple(sorted(e["masks"]))) for s, e in sorted(samples.items())
    ]


def find_samples(spec: DatasetSpec) -> list[Sample]:
    """List and pair the files of a collection, without reading pixels."""
    if spec.layout == "nuclei":
        samples = _nuclei(spec)
    elif spec.layout == "polygons":
        samples = _pair(spec, "labels", (".json", ".geojson"))
    else:
        samples = _pair(spec, "masks", MASK_SUFFIXES)
    return samples[: spec.limit] if spec.limit else samples


def load_palette(spec: DatasetSpec) -> np.ndarray:
    """The (K, 3) palette of the ``palette`` layout, index = class id."""
    uri = spec.palette or storage.join(spec.root, "classes.json")
    try:
        doc = json.loads(spec.fs(uri).read_text(uri))
        palette = np.asarray(doc["palette"] if isinstance(doc, dict) else doc, dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{uri}: cannot read the palette ({exc}); expected JSON "
            '{"palette": [[r, g, b], ...]} (index = class id); pass --palette'
        ) from exc
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise DatasetError(f"{uri}: palette must be a list of [r, g, b]; got shape {palette.shape}")
    return palette


def _palette_to_ids(rgb: np.ndarray, palette: np.ndarray, source: str) -> np.ndarray:
    if rgb.shape[-1] < 3:
        raise TileError(
            source, f"a palette mask must be RGB; found {rgb.shape[-1]} band(s)", "labels"
        )
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], codes), 0, len(keys) - 1)
    found = keys[order][pos] == codes
    if not found.all():
        y, x = np.argwhere(~found)[0]
        colour = tuple(int(v) for v in rgb[y, x, :3])
        raise TileError(
            source, f"colour {colour} at (x={x}, y={y}) is not in the palette", "labels"
        )
    return order[pos].astype(np.uint8)


def _polygon_shapes(doc: Any, tile: imagery.Tile, source: str) -> list[tuple[dict, int]]:
    to_pixels = ~tile.transform if tile.transform is not None else None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = [
            (f["geometry"], int(f.get("properties", {}).get("class", 1))) for f in doc["features"]
        ]
        shapes = []
        for geom, cls in items:
            if to_pixels is not None:
                geom = _transform_geometry(geom, to_pixels)
            shapes.append((geom, cls))
        return shapes
    if not isinstance(doc, list):
        raise TileError(
            source, "polygon labels must be a JSON list or a GeoJSON FeatureCollection", "labels"
        )
    shapes = []
    for obj in doc:
        points, cls = (
            (obj.get("points"), int(obj.get("class", 1))) if isinstance(obj, dict) else (obj, 1)
        )
        if not points or len(points) < 3:
            raise TileError(source, "every polygon needs at least 3 [x, y] vertices", "labels")
        ring = [list(p) for p in points]
        ring = ring + [ring[0]] if ring[0] != ring[-1] else ring  # GeoJSON rings are closed
        shapes.append(({"type": "Polygon", "coordinates": [ring]}, cls))
    return shapes


def _transform_geometry(geom: dict, affine: Any) -> dict:
    def ring(coords: list) -> list:
        return [list(affine * (x, y)) for x, y, *_ in coords]

    if geom["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": [ring(r) for r in geom["coordinates"]]}
    if geom["type"] == "MultiPolygon":
        polys = [[ring(r) for r in p] for p in geom["coordinates"]]
        return {"type": "MultiPolygon", "coordinates": polys}
    raise ValueError(f"unsupported geometry type {geom['type']!r}")


@gdal.scoped
def rasterize_polygons(doc: Any, tile: imagery.Tile, source: str = "<labels>") -> np.ndarray:
    """Burn polygon labels into a class-id mask the size of ``tile`` (later objects on top)."""
    from rasterio import features

    h, w, _ = tile.shape
    try:
        shapes = _polygon_shapes(doc, tile, source)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, TileError):
            raise
        raise TileError(source, f"malformed polygon labels: {exc}", "labels") from exc
    if not shapes:
        return np.zeros((h, w), np.uint8)
    return features.rasterize(shapes, out_shape=(h, w), fill=0, dtype="uint8")


def _read(uri: str, spec: DatasetSpec) -> bytes:
    try:
        return spec.fs(uri).read_bytes(uri)
    except storage.StorageError as exc:
        raise TileError(uri, f"cannot read: {exc}", "unreadable") from exc


def _read_mask(sample: Sample, spec: DatasetSpec, tile: imagery.Tile, palette: Any) -> np.ndarray:
    if spec.layout == "polygons":
        uri = sample.labels[0]
        try:
            doc = json.loads(_read(uri, spec))
        except ValueError as exc:
            raise TileError(uri, f"not valid JSON: {exc}", "labels") from exc
        return rasterize_polygons(doc, tile, uri)
    if spec.layout == "nuclei":
        merged = np.zeros(tile.shape[:2], np.uint8)
        for uri in sample.labels:
            part = open_reader(_read(uri, spec), uri=uri).read().array[..., 0]
            _check_same_size(part.shape, tile, uri, sample.image)
            merged |= (part > 0).astype(np.uint8)
        return merged
    uri = sample.labels[0]
    decoded = open_reader(_read(uri, spec), uri=uri).read().array
    if spec.layout == "palette":
        return _palette_to_ids(decoded, palette, uri)
    return imagery.as_mask(decoded, uri)


def _check_same_size(
    shape: tuple[int, ...], tile: imagery.Tile, mask_uri: str, image_uri: str
) -> None:
    if tuple(shape[:2]) != tile.shape[:2]:
        raise TileError(
            mask_uri,
            f"mask is {shape[1]}x{shape[0]} but its image {image_uri} is "
            f"{tile.shape[1]}x{tile.shape[0]}",
            "labels",
        )


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, C) image to ``size`` = (H, W), keeping the pixel type."""
    from PIL import Image

    if array.shape[:2] == tuple(size):
        return array
    h, w = size
    bands = [
        np.asarray(
            Image.fromarray(array[..., c].astype(np.float32), mode="F").resize(
                (w, h), Image.BILINEAR
            )
        )
        for c in range(array.shape[-1])
    ]
    out = np.stack(bands, axis=-1)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) class mask: no new class ids appear."""
    if mask.shape[:2] == tuple(size):
        return mask
    h, w = mask.shape[:2]
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return mask[rows[:, None], cols[None, :]]


@gdal.scoped  # the image and its labels in one GDAL environment
def load_sample(
    sample: Sample, spec: DatasetSpec, palette: np.ndarray | None = None
) -> dict[str, Any]:
    """Read, decode, check and resize one sample into ``{"id", "image", "mask", "valid"}``.

    Pixels that are no data in the image (``valid`` False) are labelled ``spec.ignore_index``;
    class ids ≥ ``spec.num_classes`` other than it are refused. Raises :class:`TileError`
    naming the file at fault.
    """
    tile = open_reader(_read(sample.image, spec), uri=sample.image).read(bands=spec.bands)
    tile = bands.apply_nodata(tile, spec.nodata)
    mask = _read_mask(sample, spec, tile, palette)
    _check_same_size(mask.shape, tile, sample.labels[0], sample.image)
    image, valid = tile.array, tile.valid
    if spec.size is not None:
        if valid is not None:  # no-data values must not bleed into their neighbours
            image = np.where(valid[..., None], image, _band_means(image, valid))
            valid = resize_mask(valid, spec.size)
        image, mask = resize_image(image, spec.size), resize_mask(mask, spec.size)
    ids = np.unique(mask)
    bad = ids[(ids >= (spec.num_classes or 256)) & (ids != spec.ignore_index)]
    if bad.size:
        raise TileError(
            sample.labels[0],
            f"class id {int(bad.max())} found but classes is {spec.num_classes} "
            f"(ids must be < classes, or {spec.ignore_index} to ignore); raise --classes",
            "labels",
        )
    if valid is None:
        valid = np.ones(mask.shape, bool)
    else:
        mask = np.where(valid, mask, np.uint8(spec.ignore_index)).astype(np.uint8)
    return {"id": sample.id, "image": image, "mask": mask, "valid": valid}


def _band_means(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band mean of the valid pixels, in the image's pixel type (0 when none is valid)."""
    if not valid.any():
        return np.zeros(image.shape[-1], image.dtype)
    return image[valid].mean(axis=0).astype(image.dtype)


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """A seeded train/val split; the same seed and file list always give the same split."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction))
    if val_fraction > 0 and len(samples) > 1:
        n_val = min(max(n_val, 1), len(samples) - 1)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [samples[i] for i in train], [samples[i] for i in val]
