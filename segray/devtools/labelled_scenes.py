"""A synthetic ``scenes`` training layout as real data comes: large UTM scenes and their buildings
as one GeoJSON in WGS84 (RFC 7946, no ``crs`` member), plus each scene's truth raster to check
rasterised labels against.

``root/images/scene_000.tif`` … (EPSG:32633, 0.5 m, side by side), ``root/labels.geojson``
(every building of every scene, ``class`` 1) and ``root/truth/scene_000.tif`` (0/1, 255 no data).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from segray.devtools import spectra, synth
from segray.io import imagery, storage
from segray.io.files import FileSystem


def write_labelled_scenes(
    out: str,
    *,
    count: int = 1,
    scene_size: int = 2048,
    seed: int = 0,
    bands: int = 3,
    dtype: str = "uint8",
    fs: FileSystem | None = None,
) -> dict[str, Any]:
    """Write ``count`` scenes of ``scene_size`` px, their labels and truth; returns a summary."""
    fs = fs or storage.filesystem(out)
    features: list[dict[str, Any]] = []
    building = 0
    for index in range(count):
        image, mask = synth.generate_tile(
            scene_size, synth.tile_seed(seed, index), "binary", bands, dtype
        )
        transform = synth.grid_transform(0, index, scene_size)
        nodata = spectra.NODATA if image.dtype == np.uint16 else None
        name = f"scene_{index:03d}.tif"
        encoded = imagery.encode_geotiff(image, synth.CRS, transform, nodata=nodata)
        fs.write_bytes(storage.join(out, "images", name), encoded)
        truth = imagery.encode_geotiff(mask, synth.CRS, transform, nodata=spectra.IGNORE)
        fs.write_bytes(storage.join(out, "truth", name), truth)
        features += _polygons(mask == 1, transform)
        building += int((mask == 1).sum())
    doc = {"type": "FeatureCollection", "features": features}
    fs.write_text(storage.join(out, "labels.geojson"), json.dumps(doc))
    total = count * scene_size * scene_size
    return {
        "out": out,
        "scenes": count,
        "size": scene_size,
        "features": len(features),
        "building_fraction": round(building / total, 4),
    }


def _polygons(where: np.ndarray, transform: Any) -> list[dict[str, Any]]:
    """The class's polygons, traced on the scene grid, as WGS84 GeoJSON features."""
    from rasterio import features
    from rasterio.warp import transform_geom

    out = []
    shapes = features.shapes(where.astype(np.uint8), mask=where, transform=transform)
    for geometry, _ in shapes:
        wgs84 = transform_geom(synth.CRS, "EPSG:4326", geometry, precision=-1)
        out.append({"type": "Feature", "properties": {"class": 1}, "geometry": wgs84})
    return out
