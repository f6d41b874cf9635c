"""Footprints: polygons rasterised back cover the mask (IoU ≥ 0.95), holes kept, CRS honoured."""

from __future__ import annotations

import numpy as np
from affine import Affine
from shapely.geometry import LinearRing

from segray.devtools import synth
from segray.io.footprints import CRS_MEMBER, footprints, rasterize


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_footprints_are_rfc7946_wgs84_by_default_and_round_trip():
    _, mask = synth.generate_tile(256, seed=4, mode="multiclass")
    transform = synth.grid_transform(1, 2, 256)
    doc = footprints(
        mask, synth.BUILDING, transform=transform, crs=synth.CRS, simplify=0.25
    )  # half a pixel
    assert "crs" not in doc and CRS_MEMBER not in doc and len(doc["features"]) > 3
    # UTM 33N (500 km E, 5,000 km N) lies at 15° E, 45.15° N: longitude first
    for feature in doc["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert np.all(np.abs(ring[:, 0] - 15.0) < 0.05) and np.all(
            np.abs(ring[:, 1] - 45.15) < 0.01
        )
        assert LinearRing(ring).is_ccw  # exterior rings counter-clockwise (RFC 7946 §3.1.6)
    back = rasterize(doc, mask.shape, transform, crs=synth.CRS)
    assert iou(back.astype(bool), mask == synth.BUILDING) >= 0.95


def test_footprints_in_the_tile_crs_or_another_name_it():
    _, mask = synth.generate_tile(128, seed=4, mode="multiclass")
    transform = synth.grid_transform(1, 2, 128)
    native = footprints(mask, synth.BUILDING, transform=transform, crs=synth.CRS, to_crs="native")
    assert native[CRS_MEMBER] == "EPSG:32633" and "crs" not in native
    x, y = native["features"][0]["geometry"]["coordinates"][0][0]
    assert 500_000 <= x <= 501_000 and 4_999_000 <= y <= 5_000_000
    mercator = footprints(
        mask, synth.BUILDING, transform=transform, crs=synth.CRS, to_crs="EPSG:3857"
    )
    assert mercator[CRS_MEMBER] == "EPSG:3857"
    for doc in (native, mercator):
        back = rasterize(doc, mask.shape, transform, crs=synth.CRS)
        assert iou(back.astype(bool), mask == synth.BUILDING) >= 0.95


def test_holes_are_kept_and_pixel_coordinates_without_georeference():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1
    mask[15:25, 15:25] = 0
    doc = footprints(mask)
    (feature,) = doc["features"]
    assert len(feature["geometry"]["coordinates"]) == 2  # outer ring + one hole
    assert feature["properties"]["pixels"] == 30 * 30 - 10 * 10
    np.testing.assert_array_equal(rasterize(doc, mask.shape), mask)


def test_min_pixels_drops_specks():
    mask = np.zeros((20, 20), np.uint8)
    mask[2, 2] = 1
    mask[10:15, 10:15] = 1
    assert len(footprints(mask, min_pixels=4)["features"]) == 1
    assert len(footprints(mask, transform=Affine(0.5, 0, 0, 0, -0.5, 0))["features"]) == 2
