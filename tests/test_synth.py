"""Synthetic tiles: determinism, class content, learnability and the collection writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from PIL import Image

from segray.devtools import synth
from segray.errors import ConfigError


def test_same_seed_is_byte_identical_and_seeds_differ():
    image, mask = synth.generate_tile(64, seed=3)
    again_image, again_mask = synth.generate_tile(64, seed=3)
    assert image.tobytes() == again_image.tobytes() and mask.tobytes() == again_mask.tobytes()
    other_image, other_mask = synth.generate_tile(64, seed=4)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(mask, other_mask)


@pytest.mark.parametrize("size", [32, 64, (48, 80), 300])
@pytest.mark.parametrize("bands", [3, 4])
def test_shapes_and_dtypes(size, bands):
    image, mask = synth.generate_tile(size, seed=1, bands=bands)
    h, w = (size, size) if isinstance(size, int) else size
    assert image.shape == (h, w, bands) and image.dtype == np.uint8
    assert mask.shape == (h, w) and mask.dtype == np.uint8


def test_every_class_appears_in_typical_tiles():
    masks = [synth.generate_tile(64, seed)[1] for seed in range(8)]
    assert set(np.unique(np.stack(masks))) == set(range(len(synth.CLASSES)))
    complete = sum(np.unique(m).size == len(synth.CLASSES) for m in masks)
    assert complete >= 6


def test_binary_mode_marks_buildings_only():
    _, multi = synth.generate_tile(64, seed=5)
    image, binary = synth.generate_tile(64, seed=5, mode="binary")
    assert set(np.unique(binary)) == {0, 1}
    np.testing.assert_array_equal(binary, multi == synth.BUILDING)
    assert image.shape == (64, 64, 3)


def test_buildings_are_distinguishable_from_background():
    images, masks = zip(*(synth.generate_tile(64, seed) for seed in range(8)), strict=True)
    pixels, labels = (
        np.concatenate([i.reshape(-1, 3) for i in images]),
        np.concatenate(masks).ravel(),
    )
    building = pixels[labels == synth.BUILDING].mean(axis=0)
    ground = pixels[labels == synth.BACKGROUND].mean(axis=0)
    assert np.abs(building - ground).max() > 25


def test_nir_is_bright_on_vegetation_and_dark_on_water():
    image, mask = synth.generate_tile(128, seed=2, bands=4)
    nir = image[..., 3].astype(float)
    assert nir[mask == synth.VEGETATION].mean() > nir[mask == synth.WATER].mean() + 100


def test_tile_seed_depends_on_index_not_count():
    assert synth.tile_seed(0, 5) == synth.tile_seed(0, 5) != synth.tile_seed(0, 6)
    assert synth.tile_seed(0, 5) != synth.tile_seed(1, 5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layout": "folders"}, "layout"),
        ({"mode": "instance"}, "mode"),
        ({"bands": 5}, "bands"),
        ({"size": 8}, "size"),
        ({"count": 0}, "count"),
    ],
)
def test_write_collection_rejects_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        synth.write_collection(str(tmp_path), **kwargs)
    assert not any(tmp_path.iterdir())


def test_generate_tile_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"mode must be one of \('multiclass', 'binary'\)"):
        synth.generate_tile(64, 0, mode="instances")
    with pytest.raises(ValueError, match="size"):
        synth.generate_tile(15, 0)


def test_paired_layout(tmp_path):
    summary = synth.write_collection(str(tmp_path), layout="paired", count=3, size=48, seed=7)
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == [f"tile_{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == images
    image = np.asarray(Image.open(tmp_path / "images" / images[1]))
    mask = np.asarray(Image.open(tmp_path / "masks" / images[1]))
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8 and mask.max() < len(synth.CLASSES)
    expected_image, expected_mask = synth.generate_tile(48, synth.tile_seed(7, 1))
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["classes"] == list(synth.CLASSES) and classes["mode"] == "multiclass"
    assert len(classes["palette"]) == len(synth.CLASSES)
    assert summary["files"] == 7 and summary["count"] == 3
    assert sum(summary["class_fractions"].values()) == pytest.approx(1, abs=1e-3)


def test_binary_classes_json(tmp_path):
    synth.write_collection(str(tmp_path), count=1, size=32, mode="binary")
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["classes"] == ["background", "building"] and classes["mode"] == "binary"


def test_geotiff_layout_is_georeferenced_on_an_adjacent_grid(tmp_path):
    synth.write_collection(str(tmp_path), layout="geotiff", count=4, size=32, bands=4)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"tile_r{r:03d}_c{c:03d}.tif" for r in range(2) for c in range(2)]
    bounds = {}
    for name in names:
        with (
            rasterio.open(tmp_path / "images" / name) as src,
            rasterio.open(tmp_path / "masks" / name) as msk,
        ):
            assert src.crs.to_epsg() == 32633 and msk.crs == src.crs
            assert src.count == 4 and msk.count == 1 and (src.width, src.height) == (32, 32)
            assert src.res == (0.5, 0.5) and msk.transform == src.transform
            bounds[name[5:-4]] = src.bounds
    assert bounds["r000_c001"].left == bounds["r000_c000"].right
    assert bounds["r001_c000"].top == bounds["r000_c000"].bottom
    assert bounds["r001_c001"].left == bounds["r001_c000"].right


def test_scene_layout(tmp_path):
    summary = synth.write_collection(str(tmp_path), layout="scene", count=1, scene_size=256)
    assert summary["size"] == 256
    with rasterio.open(tmp_path / "scenes" / "scene_000.tif") as src:
        assert (src.count, src.height, src.width) == (3, 256, 256)
        assert src.crs.to_epsg() == 32633
        image = np.moveaxis(src.read(), 0, -1)
    with rasterio.open(tmp_path / "scenes" / "scene_000_mask.tif") as msk:
        assert (msk.count, msk.height, msk.width) == (1, 256, 256)
        mask = msk.read(1)
    expected_image, expected_mask = synth.generate_tile(256, synth.tile_seed(0, 0))
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)


def test_uint16_tiles_are_reflectance_like_with_no_data_corners():
    tiles = [synth.generate_tile(64, seed, "multiclass", 6, "uint16") for seed in range(12)]
    images = np.stack([t[0] for t in tiles])
    masks = np.stack([t[1] for t in tiles])
    assert images.dtype == np.uint16 and images.shape == (12, 64, 64, 6)
    nodata = (images == 0).all(-1)
    np.testing.assert_array_equal(nodata, masks == 255)  # no data ↔ the ignored label
    assert 0 < sum(n.any() for n in nodata) < 12  # some tiles lose a corner, not all
    data = images[~nodata]
    assert data.min() >= 1 and data.max() <= 10_000
    means = data.mean(0)
    assert len(set(np.round(means, -1))) == 6  # each band its own mean
    water = masks == synth.WATER
    assert data[..., 4][(masks[~nodata] == synth.WATER)].mean() < 0.2 * means[4]  # dark SWIR
    assert water.any()
    eight_bit, _ = synth.generate_tile(64, 3)
    assert eight_bit.dtype == np.uint8  # the default stays what it was


def test_uint16_collections_are_geotiffs_with_nodata_and_bad_options_are_refused(tmp_path):
    summary = synth.write_collection(
        str(tmp_path), "geotiff", count=4, size=32, bands=4, dtype="uint16", mode="binary"
    )
    assert summary["dtype"] == "uint16"
    with rasterio.open(tmp_path / "images" / "tile_r000_c000.tif") as ds:
        assert ds.dtypes[0] == "uint16" and ds.count == 4 and ds.nodata == 0
    doc = json.loads((tmp_path / "classes.json").read_text())
    assert doc["bands"] == ["red", "green", "blue", "nir"]
    with pytest.raises(ConfigError, match="needs a GeoTIFF layout"):
        synth.write_collection(str(tmp_path / "p"), "paired", count=1, size=32, dtype="uint16")
    with pytest.raises(ConfigError, match="bands must be one of"):
        synth.generate_tile(32, 0, bands=6)  # SWIR exists in 16-bit items only
