"""Masks → GeoJSON polygons (building footprints and the like), holes kept.

Polygons follow pixel edges exactly (``rasterio.features.shapes``) and are then optionally
simplified (Douglas–Peucker via shapely, topology preserved) in the tile's own units. Documents
follow RFC 7946: by default coordinates are WGS84 longitude and latitude, exterior rings
counter-clockwise, and there is no ``crs`` member. ``to_crs`` ``native`` keeps the tile's CRS (or
another CRS may be named), which the document then names in its foreign member ``segray:crs``
(RFC 7946 §6.1; such coordinates are GeoJSON by prior arrangement only). Tiles without a
georeference give pixel units (x = column, y = row, corners).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from segray.io import gdal

if TYPE_CHECKING:
    from affine import Affine

#: The CRS of RFC 7946 GeoJSON, and the word for "the tile's own CRS".
WGS84 = "EPSG:4326"
NATIVE = "native"
#: The foreign member that names the CRS of a document not in WGS84.
CRS_MEMBER = "segray:crs"


@gdal.scoped
def footprints(
    mask: np.ndarray,
    class_index: int = 1,
    *,
    transform: Affine | None = None,
    crs: str | None = None,
    simplify: float = 0.0,
    min_pixels: int = 0,
    name: str | None = None,
    to_crs: str = WGS84,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the regions where ``mask == class_index``, in ``to_crs``
    (WGS84, ``native``, or any CRS rasterio knows) when the tile has a ``crs``.

    ``simplify`` is the tolerance in the tile's units (metres for a projected CRS, pixels
    otherwise); regions smaller than ``min_pixels`` are dropped. Each feature carries its class,
    name and area in pixels.
    """
    from affine import Affine
    from rasterio import features
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    from shapely.geometry.polygon import orient

    target = None if crs is None or to_crs in (NATIVE, crs) else to_crs
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
        geometry = mapping(orient(poly, 1.0))  # exterior counter-clockwise (RFC 7946 §3.1.6)
        if target is not None:
            geometry = transform_geom(crs, target, geometry)
        props = {"class": class_index, "name": name, "pixels": round(pixels)}
        feats.append({"type": "Feature", "geometry": geometry, "properties": props})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if crs is not None and (target or crs) != WGS84:
        doc[CRS_MEMBER] = target or crs
    return doc


@gdal.scoped
def rasterize(
    doc: dict[str, Any],
    shape: tuple[int, int],
    transform: Affine | None = None,
    crs: str | None = None,
) -> np.ndarray:
    """Burn a FeatureCollection back into a (H, W) uint8 mask of 1s on a grid of ``crs`` (the
    inverse, for checks): the document's coordinates are reprojected from its CRS (WGS84 unless
    it names another) when ``crs`` is given."""
    from affine import Affine
    from rasterio import features
    from rasterio.warp import transform_geom

    geoms = [f["geometry"] for f in doc["features"]]
    source = doc.get(CRS_MEMBER, WGS84)
    if crs is not None and source != crs:
        geoms = [transform_geom(source, crs, g) for g in geoms]
    if not geoms:
        return np.zeros(shape, np.uint8)
    affine = transform if transform is not None else Affine.identity()
    return features.rasterize(
        geoms, out_shape=shape, transform=affine, fill=0, default_value=1, dtype="uint8"
    )
