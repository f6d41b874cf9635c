"""Synthetic satellite imagery with exact masks, for demos and tests.

Ground, vegetation, water, roads and buildings (with cast shadows) are drawn from
``np.random.default_rng(seed)`` alone, so a seed gives byte-identical arrays at any size.
"""

from __future__ import annotations

import json
import math

import numpy as np
from affine import Affine
from PIL import Image, ImageDraw

from segray.devtools import spectra
from segray.devtools.noise import value_noise
from segray.errors import ConfigError
from segray.inference.render import PALETTE
from segray.io import imagery, storage
from segray.io.files import FileSystem

CLASSES = ("background", "building", "road", "water", "vegetation")
BINARY_CLASSES = ("background", "building")
LAYOUTS = ("paired", "geotiff", "scene")
MODES = ("multiclass", "binary")
BANDS = (3, 4, 6)  # RGB, RGB+NIR, and two SWIR bands more (16-bit only)
CRS = "EPSG:32633"  # UTM 33N: a real projected CRS with metre units
RESOLUTION = 0.5  # metres per pixel
ORIGIN = (500_000.0, 5_000_000.0)  # top-left corner of tile (0, 0) / scene 0

BACKGROUND, BUILDING, ROAD, WATER, VEGETATION = range(5)

# Colours as (R, G, B, NIR): vegetation is bright in NIR, water nearly black.
_SOIL = np.array([152, 128, 96, 115], np.float32)
_GRASS = np.array([110, 128, 72, 170], np.float32)
_TREES = np.array([48, 84, 42, 215], np.float32)
_WATER = np.array([32, 58, 86, 14], np.float32)
_ASPHALT = np.array([104, 106, 110, 80], np.float32)
# Roofs: terracotta, concrete, white membrane, dark tar, painted metal.
_ROOFS = np.array(
    [[178, 82, 60, 100], [188, 186, 180, 120], [226, 224, 216, 140], [88, 90, 98, 70]]
    + [[126, 142, 164, 110]],
    np.float32,
)
_SUN = np.array([0.6, 0.8])  # image (x, y) direction shadows are cast towards
_SHADOW_DIM = 0.5


def class_names(mode: str = "multiclass") -> tuple[str, ...]:
    """Class names, indexed by mask value, for ``mode`` ("multiclass" or "binary")."""
    _check_choice("mode", mode, MODES)
    return CLASSES if mode == "multiclass" else BINARY_CLASSES


def colour_mask(mask: np.ndarray, mode: str = "multiclass") -> np.ndarray:
    """RGB preview (H, W, 3) uint8 of a class-id mask using ``PALETTE``."""
    palette = np.asarray(PALETTE[: len(class_names(mode))], np.uint8)
    return palette[mask]


def tile_seed(seed: int, index: int) -> int:
    """Seed of item ``index`` in a collection; independent of how many items are written."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_tile(
    size: int | tuple[int, int],
    seed: int,
    mode: str = "multiclass",
    bands: int = 3,
    dtype: str = "uint8",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic tile.

    Returns ``(image, mask)``: image (H, W, bands), RGB, RGB+NIR or (uint16 only) RGB+NIR+SWIR;
    mask uint8 (H, W) of class ids from ``class_names(mode)`` - the class of what is visible at
    each pixel. uint16 images are reflectance x 10,000 with a no-data corner on some tiles
    (0 in the image, 255 in the mask; :mod:`segray.devtools.spectra`).
    """
    height, width = _check_size("size", size)
    _check_choice("mode", mode, MODES)
    _check_options(bands, dtype)
    rng = np.random.default_rng(seed)
    labels, building_ids, roof_colours, shadow = _layout(rng, height, width)
    image = _render(rng, labels, building_ids, roof_colours, shadow)
    classes = (labels == BUILDING).astype(np.uint8) if mode == "binary" else labels
    if dtype == "uint8":
        return image[..., : int(bands)], classes
    image = spectra.reflectance(image, labels, int(bands), rng)
    edge = spectra.nodata_edge(rng, height, width)
    if edge is not None:
        image[edge], classes[edge] = spectra.NODATA, spectra.IGNORE
    return image, classes


# --- layout: where each class is --------------------------------------------------------------


def _layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, ...]:
    """Class labels, building ids (0 = none), roof colour per building id, and shadows."""
    theta = rng.uniform(0, math.pi / 2)  # dominant street orientation of this tile
    vegetation = _vegetation(rng, h, w)
    water = _water(rng, h, w)
    road, keep_out = _roads(rng, h, w, theta)
    building_ids, roof_colours, shadow = _buildings(rng, h, w, theta, keep_out | water)
    labels = np.zeros((h, w), np.uint8)
    labels[vegetation] = VEGETATION
    labels[water] = WATER
    labels[road] = ROAD  # over water too: bridges
    labels[building_ids > 0] = BUILDING
    return labels, building_ids, roof_colours, shadow


def _vegetation(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Patches of trees: the top ``fraction`` of a smooth noise field."""
    field = value_noise(rng, h, w, cell=48, octaves=4)
    fraction = rng.uniform(0.12, 0.35)
    return field > np.quantile(field, 1 - fraction)


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Lakes (wobbly ellipses, at least one) and sometimes a river."""
    water = np.zeros((h, w), bool)
    wobble = value_noise(rng, h, w, cell=16, octaves=2) - 0.5
    for _ in range(max(1, rng.poisson(h * w / 220**2))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(5, np.clip(0.35 * min(h, w), 8, 40), 2)
        y0, y1 = max(0, int(cy - 1.5 * ry)), min(h, int(cy + 1.5 * ry) + 1)
        x0, x1 = max(0, int(cx - 1.5 * rx)), min(w, int(cx + 1.5 * rx) + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dist = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        water[y0:y1, x0:x1] |= dist + 0.8 * wobble[y0:y1, x0:x1] < 1
    rivers = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(rivers)
    for _ in range(rng.poisson(0.25 + h * w / 1024**2)):
        path = _path(rng, (h, w), 1.5 * max(h, w), 0.12, _angle(rng))
        draw.line(path, fill=1, width=int(rng.integers(6, 17)), joint="curve")
    return water | np.asarray(rivers)


def _roads(rng: np.random.Generator, h: int, w: int, theta: float) -> tuple[np.ndarray, ...]:
    """Road pixels and a wider keep-out band that buildings must not touch."""
    road, keep_out = Image.new("1", (w, h), 0), Image.new("1", (w, h), 0)
    road_draw, keep_out_draw = ImageDraw.Draw(road), ImageDraw.Draw(keep_out)
    for _ in range(max(1, rng.poisson(h * w / 170**2))):
        straight = rng.random() < 0.6
        heading = theta + rng.integers(0, 4) * math.pi / 2 if straight else _angle(rng)
        length = rng.uniform(0.5, 1.0) * min(1.5 * max(h, w), 640)
        path = _path(rng, (h, w), length, 0.0 if straight else 0.15, heading)
        width = int(rng.integers(3, 8))
        road_draw.line(path, fill=1, width=width, joint="curve")
        keep_out_draw.line(path, fill=1, width=width + 8, joint="curve")
    return np.asarray(road), np.asarray(keep_out)


def _path(
    rng: np.random.Generator, shape: tuple, length: float, turn: float, heading: float
) -> list:
    """A random-walk polyline of ``length`` px through a random point of the tile (flat x, y)."""
    step = 8.0
    n = max(2, int(length / step))
    headings = heading + np.cumsum(rng.normal(0, turn, n)) if turn else np.full(n, heading)
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    points = np.cumsum(steps, axis=0)
    centre = rng.uniform((0, 0), shape[::-1])
    points += centre - points[n // 2]  # the middle of the path lies inside the tile
    return points.ravel().tolist()


def _angle(rng: np.random.Generator) -> float:
    return rng.uniform(0, 2 * math.pi)


def _buildings(
    rng: np.random.Generator, h: int, w: int, theta: float, blocked: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated rectangles and L-shapes off roads and water.

    Returns per-pixel building ids (0 = none), a roof colour table indexed by id, and shadows.
    """
    wanted = max(1, rng.poisson(h * w * rng.uniform(1 / 2000, 1 / 600)))
    n = 3 * wanted + 4  # candidates: some land on roads or water and are dropped
    centres = rng.uniform((0, 0), (w, h), (n, 2))
    half = rng.uniform(3, 11, (n, 2))
    aligned = theta + rng.integers(0, 2, n) * math.pi / 2 + rng.normal(0, 0.04, n)
    angles = np.where(rng.random(n) < 0.75, aligned, rng.uniform(0, math.pi, n))
    cuts = np.where(rng.random((n, 1)) < 0.3, rng.uniform(0.3, 0.6, (n, 2)), 0.0)
    heights = rng.uniform(2, 8, n)
    colours = _ROOFS[rng.integers(0, len(_ROOFS), n)] * rng.uniform(0.88, 1.08, (n, 1))
    to_image = _placement(centres, half, angles)
    probe = np.stack(np.meshgrid(*[np.linspace(-1, 1, 5)] * 2), -1).reshape(-1, 2)
    px = to_image(np.broadcast_to(probe, (n, *probe.shape)))
    hit = blocked[_pixel_at(px[..., 1], h), _pixel_at(px[..., 0], w)].any(axis=1)
    # Large scenes get denser and sparser districts rather than one uniform density.
    urban = value_noise(rng, h, w, cell=512, octaves=2)[
        _pixel_at(centres[:, 1], h), _pixel_at(centres[:, 0], w)
    ]
    sparse = rng.random(n) > np.clip(2.5 * urban - 0.6, 0.15, 1.0)
    keep = np.flatnonzero(~(hit | sparse))[:wanted]
    keep = keep if keep.size else np.flatnonzero(~hit)[:1]  # small tiles: at least one building
    ids, shadow = _draw_buildings(h, w, to_image(_outline(cuts))[keep], heights[keep])
    table = np.concatenate([np.zeros((1, 4), np.float32), colours[keep].astype(np.float32)])
    return ids, table, shadow


def _pixel_at(coordinate: np.ndarray, n: int) -> np.ndarray:
    """Nearest pixel index of image coordinates, clipped to the image."""
    return np.clip(np.round(coordinate).astype(np.int64), 0, n - 1)


def _placement(centres: np.ndarray, half: np.ndarray, angles: np.ndarray):  # noqa: ANN202
    """A function mapping (n, k, 2) unit-square coordinates to image coordinates per building."""
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def to_image(local: np.ndarray) -> np.ndarray:
        x, y = local[..., 0] * half[:, :1], local[..., 1] * half[:, 1:]
        return np.stack([x * cos - y * sin, x * sin + y * cos], -1) + centres[:, None, :]

    return to_image


def _outline(cuts: np.ndarray) -> np.ndarray:
    """Six-vertex outlines in the unit square: an L when a corner is cut, else a rectangle."""
    a, b = 1 - 2 * cuts[:, 1], 1 - 2 * cuts[:, 0]
    one = np.ones_like(a)
    xs = np.stack([-one, one, one, b, b, -one], 1)
    ys = np.stack([-one, -one, a, a, one, one], 1)
    return np.stack([xs, ys], -1)


def _draw_buildings(
    h: int, w: int, outlines: np.ndarray, heights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise footprints (value = 1-based building id) and shadows swept along the sun."""
    ids, shadow = Image.new("I", (w, h), 0), Image.new("L", (w, h), 0)
    ids_draw, shadow_draw = ImageDraw.Draw(ids), ImageDraw.Draw(shadow)
    for k, (outline, height) in enumerate(zip(outlines, heights, strict=True), start=1):
        for t in (0.25, 0.5, 0.75, 1.0):
            shadow_draw.polygon((outline + t * height * _SUN).ravel().tolist(), fill=1)
        ids_draw.polygon(outline.ravel().tolist(), fill=k)
    return np.asarray(ids), np.asarray(shadow).astype(bool)


# --- rendering: what each pixel looks like ----------------------------------------------------


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    building_ids: np.ndarray,
    roof_colours: np.ndarray,
    shadow: np.ndarray,
) -> np.ndarray:
    """RGB+NIR uint8 image: textured ground, then class colours, shadows and sensor noise."""
    h, w = labels.shape
    image = _ground(rng, h, w)
    grain = value_noise(rng, h, w, cell=6, octaves=2) - 0.5
    canopy = value_noise(rng, h, w, cell=4, octaves=2) - 0.5
    for cls, colour, texture, amount in (
        (VEGETATION, _TREES, canopy, 1.0),
        (WATER, _WATER, grain, 0.25),
        (ROAD, _ASPHALT, grain, 0.15),
    ):
        where = labels == cls
        image[where] = colour * (1 + amount * texture[where, None])
    where = building_ids > 0
    image[where] = roof_colours[building_ids[where]] * (1 + 0.2 * grain[where, None])
    image[shadow & ~where] *= _SHADOW_DIM
    image += 2.5 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Bare soil blending into grass, with a medium-scale mottle; (H, W, 4) float32."""
    grassiness = np.clip((value_noise(rng, h, w, cell=96, octaves=4) - 0.35) / 0.3, 0, 1)
    mottle = value_noise(rng, h, w, cell=12, octaves=3) - 0.5
    image = _SOIL + grassiness[..., None] * (_GRASS - _SOIL)
    image *= 1 + 0.35 * mottle[..., None]
    return image


# --- collections on disk or S3 ----------------------------------------------------------------


def write_collection(
    out: str,
    layout: str = "paired",
    count: int = 16,
    size: int = 64,
    seed: int = 0,
    mode: str = "multiclass",
    bands: int = 3,
    fs: FileSystem | None = None,
    scene_size: int = 2048,
    dtype: str = "uint8",
) -> dict:
    """Write ``count`` synthetic items and ``classes.json`` under ``out`` (path, file://, s3://).

    Layouts: "paired" - ``images/tile_00000.png`` + ``masks/tile_00000.png`` (class ids, one
    channel; with bands=4 the image PNG is RGBA with NIR as alpha); "geotiff" -
    ``images|masks/tile_r000_c000.tif`` tiles in EPSG:32633 at 0.5 m, adjacent on a near-square
    grid; "scene" - ``scenes/scene_000.tif`` + ``scene_000_mask.tif`` of ``scene_size`` px.
    Item i is drawn from ``tile_seed(seed, i)``, so it does not depend on ``count``. uint16
    collections need a GeoTIFF layout; their files have nodata 0. ``fs`` holds ``out`` (by
    default the one :func:`storage.filesystem` chooses).
    """
    fs = fs or storage.filesystem(out)
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("mode", mode, MODES)
    _check_options(bands, dtype)
    if dtype != "uint8" and layout == "paired":
        raise ConfigError(f"dtype {dtype} needs a GeoTIFF layout (geotiff or scene), not paired")
    side = _check_side("scene_size", scene_size) if layout == "scene" else _check_side("size", size)
    _check_side("count", count, minimum=1)
    names = class_names(mode)
    pixels = np.zeros(len(names), np.int64)
    columns = math.ceil(math.sqrt(count))
    for index in range(count):
        image, mask = generate_tile(side, tile_seed(seed, index), mode, bands, dtype)
        row, col = divmod(index, columns)
        image_path, mask_path = _item_paths(layout, index, row, col)
        image_bytes, mask_bytes = _encode(layout, image, mask, grid_transform(row, col, side))
        fs.write_bytes(storage.join(out, image_path), image_bytes)
        fs.write_bytes(storage.join(out, mask_path), mask_bytes)
        pixels += np.bincount(mask.ravel(), minlength=256)[: len(names)]
    _write_classes(out, mode, bands, fs)
    fractions = {n: round(float(p / pixels.sum()), 4) for n, p in zip(names, pixels, strict=True)}
    summary = {"out": out, "layout": layout, "mode": mode, "bands": bands, "dtype": dtype}
    summary["count"] = count
    return summary | {"size": side, "files": 2 * count + 1, "class_fractions": fractions}


def grid_transform(row: int, col: int, size: int) -> Affine:
    """Georeference of the ``size`` px tile at (row, col) of the collection grid (north up)."""
    x0, y0 = ORIGIN
    step = size * RESOLUTION
    return Affine(RESOLUTION, 0.0, x0 + col * step, 0.0, -RESOLUTION, y0 - row * step)


def _item_paths(layout: str, index: int, row: int, col: int) -> tuple[str, str]:
    """Image and mask paths, relative to the collection root, of one item."""
    if layout == "paired":
        name = f"tile_{index:05d}.png"
        return f"images/{name}", f"masks/{name}"
    if layout == "geotiff":
        name = f"tile_r{row:03d}_c{col:03d}.tif"
        return f"images/{name}", f"masks/{name}"
    return f"scenes/scene_{index:03d}.tif", f"scenes/scene_{index:03d}_mask.tif"


def _encode(
    layout: str, image: np.ndarray, mask: np.ndarray, transform: Affine
) -> tuple[bytes, bytes]:
    if layout == "paired":
        return imagery.encode_png(image), imagery.encode_png(mask)
    nodata = spectra.NODATA if image.dtype == np.uint16 else None
    encoded = imagery.encode_geotiff(image, CRS, transform, nodata=nodata)
    return encoded, imagery.encode_geotiff(mask, CRS, transform)


def _write_classes(out: str, mode: str, bands: int, fs: FileSystem) -> None:
    names = class_names(mode)
    doc = {
        "classes": list(names),
        "palette": [list(rgb) for rgb in PALETTE[: len(names)]],
        "mode": mode,
        "bands": list(spectra.BAND_NAMES[:bands]),
    }
    fs.write_text(storage.join(out, "classes.json"), json.dumps(doc, indent=2) + "\n")


# --- argument checks --------------------------------------------------------------------------


def _check_choice(field: str, value: object, allowed: tuple) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ConfigError(f"{field} must be one of {allowed}; got {value!r}")


def _check_options(bands: object, dtype: object) -> None:
    _check_choice("dtype", dtype, spectra.DTYPES)
    _check_choice("bands", bands, BANDS if dtype == "uint16" else BANDS[:2])


def _check_side(field: str, value: object, minimum: int = 16) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{field} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_size(field: str, size: object) -> tuple[int, int]:
    """(height, width) from an int or a pair of ints, each >= 16."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _check_side(field, size[0]), _check_side(field, size[1])
    side = _check_side(field, size)
    return side, side
