"""Masks → GeoJSON polygons (building footprints and the like), holes kept.

Polygons follow pixel edges exactly (``rasterio.features.shapes``) and are then optionally
simplified (Douglas–Peucker via shapely, topology preserved). Coordinates are in the tile's or
scene's CRS when it is georeferenced, else in pixel units (x = column, y = row, corners).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from affine import Affine


def footprints(
    mask: np.ndarray,
    class_index: int = 1,
    *,
    transform: Affine | None = None,
    crs: str | None = None,
    simplify: float = 0.0,
    min_pixels: int = 0,
    name: str | None = None,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the regions where ``mask == class_index``.

    ``simplify`` is the tolerance in output units (metres for a projected CRS, pixels otherwise);
    regions smaller than ``min_pixels`` are dropped. Each feature carries its class, name and area
    in pixels.
    """
    from affine import Affine
    from rasterio import features
    from shapely.geometry import mapping, shape

    binary = (np.asarray(mask) == class_index).astype(np.uint8)
    affine = transform if transform is not None else Affine.identity()
    pixel_area = abs(affine.a * affine.e - affine.b * affine.d) or 1.0
    feats = []
    for geom, _ in features.shapes(binary, mask=binary.astype(bool), transform=affine):
        poly = shape(geom)
        pixels = poly.area / pixel_area
        if pixels < min_pixels:
            continue
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        props = {"class": class_index, "name": name, "pixels": round(pixels)}
        feats.append({"type": "Feature", "geometry": mapping(poly), "properties": props})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if crs is not None:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    return doc


def rasterize(
    doc: dict[str, Any], shape: tuple[int, int], transform: Affine | None = None
) -> np.ndarray:
    """Burn a FeatureCollection back into a (H, W) uint8 mask of 1s (the inverse, for checks)."""
    from affine import Affine
    from rasterio import features

    geoms = [f["geometry"] for f in doc["features"]]
    if not geoms:
        return np.zeros(shape, np.uint8)
    affine = transform if transform is not None else Affine.identity()
    return features.rasterize(
        geoms, out_shape=shape, transform=affine, fill=0, default_value=1, dtype="uint8"
    )
