"""Reflectance-like multispectral pixels and no-data edges for synthetic collections: what
``segray synth --dtype uint16 --bands 4|6`` writes, so that tests and the demo meet what real
16-bit imagery brings.

The 8-bit red, green, blue and NIR rendering of :mod:`segray.devtools.synth` becomes surface
reflectance x 10,000 (the scale of Sentinel-2 L2A and Landsat Collection 2 products): each band
has its own gain and offset, so its own mean, and two short-wave infrared bands follow the class
of each pixel (water is dark there, bare soil and roofs bright, vegetation in between). Some
items lose a corner to no data, as a scene's edge does: those pixels are 0 in every band
(the files' nodata value) and :data:`IGNORE` in the mask.
"""

from __future__ import annotations

import numpy as np

#: Band names, in file order, of 3-, 4- and 6-band items.
BAND_NAMES = ("red", "green", "blue", "nir", "swir1", "swir2")
DTYPES = ("uint8", "uint16")
#: The nodata value of 16-bit items, and the mask value under it.
NODATA = 0
IGNORE = 255
#: Share of items that lose a corner to no data.
EDGE_SHARE = 0.3

# 8-bit value → reflectance x 10,000: gain and offset per band (red, green, blue, NIR).
_GAIN = np.array([30.0, 27.0, 24.0, 38.0], np.float32)
_OFFSET = np.array([250.0, 400.0, 600.0, 150.0], np.float32)
# SWIR-1 and SWIR-2 reflectance x 10,000 by class: background, building, road, water, vegetation.
_SWIR = np.array([[2600, 2000], [2400, 1900], [1700, 1450], [90, 45], [1500, 700]], np.float32)


def reflectance(
    image: np.ndarray, labels: np.ndarray, bands: int, rng: np.random.Generator
) -> np.ndarray:
    """uint16 reflectance (H, W, ``bands``) of an 8-bit RGBN rendering and its class labels."""
    h, w = labels.shape
    out = image[..., :4].astype(np.float32) * _GAIN + _OFFSET
    if bands > 4:
        texture = 1 + 0.15 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)
        brightness = image[..., :3].mean(-1, keepdims=True) / 128.0  # shadows darken SWIR too
        swir = _SWIR[labels] * texture * np.clip(brightness, 0.3, 1.5)
        out = np.concatenate([out, swir], axis=-1)
    out += 20 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out[..., :bands], 1, 10_000).round().astype(np.uint16)


def nodata_edge(rng: np.random.Generator, h: int, w: int) -> np.ndarray | None:
    """A corner lost to no data on :data:`EDGE_SHARE` of the items, as (H, W) bool, else None."""
    if rng.random() >= EDGE_SHARE:
        return None
    yy, xx = np.mgrid[0:h, 0:w]
    corner = int(rng.integers(0, 4))
    y = yy if corner < 2 else h - 1 - yy
    x = xx if corner % 2 == 0 else w - 1 - xx
    depth = rng.uniform(0.2, 0.6) * (h + w) / 2
    return (y + x) < depth
