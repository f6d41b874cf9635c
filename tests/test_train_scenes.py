"""Training from large scenes: vector labels in any CRS, label rasters on any grid, chips by
windowed reads, held-out blocks, and chips streamed to the workers epoch by epoch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyogrio
import pytest
import rasterio

from segray import inference, metrics
from segray.datasets import chips, sampling
from segray.datasets.labels import DatasetSpec
from segray.devtools.labelled_scenes import write_labelled_scenes
from segray.errors import ConfigError, DatasetError, TileError
from segray.evaluate.evaluate import EvalConfig, evaluate
from segray.io import imagery, storage
from segray.models import saving
from segray.train.augment import AugmentConfig
from segray.train.config import TrainConfig
from segray.train.driver import train
from segray.train.feed import ChipFeed, Shared


@pytest.fixture(scope="module")
def one_scene(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("scenes"))
    write_labelled_scenes(root, count=1, scene_size=768, seed=5)
    return root


def spec_of(root: str, **kw) -> DatasetSpec:
    base = dict(root=root, layout="scenes", num_classes=2, size=64, val_fraction=0.2, seed=1)
    return DatasetSpec(**(base | kw))


def truth(root: str, index: int = 0) -> np.ndarray:
    with rasterio.open(f"{root}/truth/scene_{index:03d}.tif") as ds:
        return ds.read(1)


def draws(split: sampling.ChipSplit, n: int, positive: float = 0.0, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [sampling.draw(split, rng, positive) for _ in range(n)]


def test_wgs84_geojson_over_a_utm_scene_rasterises_to_the_truth(one_scene):
    spec = spec_of(one_scene, labels=f"{one_scene}/labels.geojson")
    scenes = chips.find_scenes(spec)
    assert scenes[0].crs == "EPSG:32633" and len(scenes[0].vector) > 50
    split = sampling.split(scenes, spec)
    expected = truth(one_scene)
    for chip in draws(split, 40, positive=0.5):
        got = chips.read_chip(scenes[0], chip, 64, spec)
        window = expected[chip.row : chip.row + 64, chip.col : chip.col + 64]
        np.testing.assert_array_equal(got["mask"], window, err_msg=str(chip))
        assert got["image"].shape == (64, 64, 3)
    # only the features meeting a chip are burnt: a spatial index, not a scan
    hits = scenes[0].vector.meeting(0, 0, 64, 64)
    assert 0 < len(hits) < len(scenes[0].vector) / 4


def test_per_scene_labels_in_other_crs_and_formats(one_scene, tmp_path):
    root = tmp_path / "layout"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(f"{one_scene}/images/scene_000.tif", root / "images")
    meta, _, wkb, _ = pyogrio.raw.read(f"{one_scene}/labels.geojson")
    import shapely
    from rasterio.warp import transform as warp

    def to_mercator(xy):
        xs, ys = warp("EPSG:4326", "EPSG:3857", xy[:, 0], xy[:, 1])
        return np.column_stack([xs, ys])

    geoms = shapely.transform(shapely.from_wkb(wkb), to_mercator)
    kinds = np.full(len(geoms), 1, np.int32)
    pyogrio.raw.write(
        str(root / "labels" / "scene_000.fgb"),
        shapely.to_wkb(geoms),
        [kinds],
        ["kind"],
        driver="FlatGeobuf",
        crs="EPSG:3857",
        geometry_type="Polygon",
    )
    spec = spec_of(str(root), class_field="kind")
    scenes = chips.find_scenes(spec)
    split = sampling.split(scenes, spec)
    expected = truth(one_scene)
    for chip in draws(split, 20, positive=1.0):
        got = chips.read_chip(scenes[0], chip, 64, spec)["mask"]
        window = expected[chip.row : chip.row + 64, chip.col : chip.col + 64]
        assert (got == window).mean() > 0.999, chip  # EPSG:3857 round trip: sub-millimetre
    with pytest.raises(DatasetError, match="no field 'klass'.*fields: kind"):
        chips.find_scenes(spec_of(str(root), class_field="klass"))


def test_label_raster_on_another_grid_is_read_window_by_window(one_scene, tmp_path):
    root = tmp_path / "raster"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = f"{one_scene}/images/scene_000.tif"
    shutil.copy(image, root / "images")
    expected = truth(one_scene)
    with rasterio.open(image) as ds:
        transform = ds.transform
    # labels cover only a part of the scene, on a grid starting 100 columns, 60 rows in
    part = expected[60:600, 100:700]
    shifted = transform @ rasterio.Affine.translation(100, 60)
    encoded = imagery.encode_geotiff(part, "EPSG:32633", shifted)
    (root / "labels" / "scene_000.tif").write_bytes(encoded)
    spec = spec_of(str(root))
    scenes = chips.find_scenes(spec)
    for chip in draws(sampling.split(scenes, spec), 20):
        got = chips.read_chip(scenes[0], chip, 64, spec)["mask"]
        want = np.full((64, 64), 255, np.uint8)
        rows = np.arange(chip.row, chip.row + 64)
        cols = np.arange(chip.col, chip.col + 64)
        inside = ((rows >= 60) & (rows < 600))[:, None] & ((cols >= 100) & (cols < 700))[None]
        want[inside] = expected[chip.row : chip.row + 64, chip.col : chip.col + 64][inside]
        np.testing.assert_array_equal(got, want, err_msg=str(chip))


def test_labels_that_miss_the_scene_are_named(one_scene, tmp_path):
    root = tmp_path / "wrong"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(f"{one_scene}/images/scene_000.tif", root / "images")
    # UTM coordinates in a GeoJSON without a crs member: read as WGS84, they land nowhere near
    utm = '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},'
    utm += '"geometry": {"type": "Polygon", "coordinates": [[[500010, 4999990], [500030, '
    utm += "4999990], [500030, 4999970], [500010, 4999990]]]}}]}"
    (root / "labels" / "scene_000.geojson").write_text(utm)
    with pytest.raises(
        DatasetError,
        match=r"scene_000.geojson: its labels (cover none of|cannot be placed on) a? ?scene",
    ):
        chips.find_scenes(spec_of(str(root)))
    far = utm.replace("500010", "20.1").replace("500030", "20.2")
    far = far.replace("4999990", "10.1").replace("4999970", "10.2")
    (root / "labels" / "scene_000.geojson").write_text(far)
    with pytest.raises(DatasetError, match=r"scene_000.geojson: its labels cover none of scene"):
        chips.find_scenes(spec_of(str(root)))
    with pytest.raises(DatasetError, match="no labels for this scene"):
        (root / "labels" / "scene_000.geojson").unlink()
        chips.find_scenes(spec_of(str(root)))


def test_class_ids_beyond_classes_are_refused_naming_the_file(one_scene):
    spec = spec_of(one_scene, labels=f"{one_scene}/labels.geojson", num_classes=2)
    scenes = chips.find_scenes(spec)
    split = sampling.split(scenes, spec)
    chip = draws(split, 1, positive=1.0)[0]
    narrow = spec_of(one_scene, labels=f"{one_scene}/labels.geojson", num_classes=1)
    with pytest.raises(TileError, match="labels.geojson.*class id 1"):
        chips.read_chip(scenes[0], chip, 64, narrow)


def test_training_chips_keep_clear_of_held_out_blocks(one_scene):
    spec = spec_of(one_scene, labels=f"{one_scene}/labels.geojson", block_size=128)
    split = sampling.split(chips.find_scenes(spec), spec)
    blocks = split.held_out[0]
    assert len(blocks) == round(36 * 0.2)  # a 768 px scene holds 6 x 6 blocks of 128 px
    val = {(c.col, c.row) for c in split.val_chips}
    assert len(val) == 4 * len(blocks)  # each block is a 2 x 2 grid of 64 px chips
    taken = np.zeros((768, 768), bool)
    for chip in draws(split, 300, positive=0.5):
        taken[chip.row : chip.row + 64, chip.col : chip.col + 64] = True
    for col, row, w, h in blocks:
        assert not taken[row : row + h, col : col + w].any()
    assert taken.mean() > 0.5  # and training still reaches most of the rest


def test_chips_are_drawn_anew_each_epoch_and_again_on_a_rerun(one_scene):
    spec = spec_of(one_scene, labels=f"{one_scene}/labels.geojson")
    split = sampling.split(chips.find_scenes(spec), spec)
    feed = ChipFeed(Shared(split), spec, per_epoch=16, global_batch=8)
    first = [feed.load_train(r)["id"] for r in feed.train_rows(1, 0, 2)]
    again = [feed.load_train(r)["id"] for r in feed.train_rows(1, 0, 2)]
    other = [feed.load_train(r)["id"] for r in feed.train_rows(1, 1, 2)]
    later = [feed.load_train(r)["id"] for r in feed.train_rows(2, 0, 2)]
    assert first == again and len(first) == 8
    assert not set(first) & set(other) and not set(first) & set(later)
    vals = [feed.val_rows(rank, 2) for rank in (0, 1)]
    assert len(vals[0]) == len(vals[1]) and feed.val_count % 8 == 0
    assert sum(r["weight"] for v in vals for r in v) == len(split.val_chips)


def test_val_split_by_scenes_holds_out_whole_scenes(tmp_path):
    root = str(tmp_path / "three")
    write_labelled_scenes(root, count=3, scene_size=256, seed=2)
    spec = spec_of(root, labels=f"{root}/labels.geojson", val_split="scenes", val_fraction=0.3)
    split = sampling.split(chips.find_scenes(spec), spec)
    assert len(split.held_out) == 1 and len(split.train_scenes) == 2
    (held,) = split.held_out
    assert held not in split.train_scenes
    assert {c.scene for c in split.val_chips} == {held} and len(split.val_chips) == 16


@pytest.mark.slow
def test_a_model_learns_from_one_scene_and_wgs84_polygons(tmp_path, ray_local):
    root = str(tmp_path / "scene")
    write_labelled_scenes(root, count=1, scene_size=1024, seed=7)
    out = str(tmp_path / "run")
    cfg = TrainConfig(
        data=root,
        out=out,
        layout="scenes",
        labels=f"{root}/labels.geojson",
        model_options={"base_filters": 8, "depth": 3},
        num_classes=2,
        size=64,
        epochs=8,
        chips_per_epoch=128,
        positive_fraction=0.5,
        batch_size=8,
        workers=2,
        learning_rate=3e-3,
        max_failures=0,
        augment=AugmentConfig(hue=0.0, brightness=0.0, contrast=0.0),
    )
    result = train(cfg)
    assert result.epochs_run == 8
    model, card = saving.load_model(out)
    assert card.stats is not None and len(card.stats.mean) == 3
    spec = spec_of(root, labels=f"{root}/labels.geojson", seed=cfg.seed)
    split = sampling.split(chips.find_scenes(spec), spec)
    cm = metrics.ConfusionMatrix(2)
    expected = truth(root)
    for chip in split.val_chips:
        row = chips.read_chip(split.scenes[0], chip, 64, spec)
        x = inference.prepare(imagery.Tile(row["image"]), card)[None]
        pred = inference.render(inference.infer(model, x, card), card)
        window = expected[chip.row : chip.row + 64, chip.col : chip.col + 64]
        cm.update(window[None], pred)
    assert cm.iou[1] >= 0.5, cm.table()
    # segray eval --held-out rebuilds the run's split from its config.yaml: the same chips, IoU
    report = evaluate(
        EvalConfig(
            model=out,
            data=root,
            layout="scenes",
            labels=f"{root}/labels.geojson",
            held_out=True,
            worst=1,
        )
    )
    assert report["tiles"] == len(split.val_chips)
    np.testing.assert_array_equal(report["confusion_matrix"], cm.matrix)
    whole = evaluate(
        EvalConfig(
            model=out,
            data=root,
            layout="scenes",
            labels=f"{root}/labels.geojson",
            out=str(tmp_path / "whole"),
            worst=0,
        )
    )
    assert whole["tiles"] == 16 * 16  # a 1,024 px scene in 64 px chips


def item_collection(root: str, count: int, labels: bool = True) -> str:
    """A STAC ItemCollection over the scenes of ``root``, relative hrefs, labels as assets."""
    features = []
    for i in range(count):
        assets = {
            "image": {
                "href": f"./images/scene_{i:03d}.tif",
                "roles": ["data"],
                "type": "image/tiff; application=geotiff",
            },
            "thumbnail": {"href": "./thumb.png", "type": "image/png", "roles": ["thumbnail"]},
        }
        if labels:
            assets["buildings"] = {
                "href": "./labels.geojson",
                "type": "application/geo+json",
                "roles": ["labels"],
            }
        features.append(
            {
                "type": "Feature",
                "stac_version": "1.1.0",
                "id": f"scene-{i}",
                "geometry": None,
                "properties": {"datetime": "2026-01-01T00:00:00Z"},
                "links": [],
                "assets": assets,
            }
        )
    uri = f"{root}/items.json"
    storage.write_text(uri, json.dumps({"type": "FeatureCollection", "features": features}))
    return uri


def test_stac_items_are_scenes_with_their_labels_assets(tmp_path):
    root = str(tmp_path / "stac")
    write_labelled_scenes(root, count=2, scene_size=256, seed=4)
    spec = spec_of(root, stac=item_collection(root, 2))
    scenes = chips.find_scenes(spec)
    assert [s.id for s in scenes] == ["scene-0", "scene-1"]
    assert all(s.labels == f"{root}/labels.geojson" and len(s.vector) for s in scenes)
    split = sampling.split(scenes, spec)
    for chip in draws(split, 10, positive=1.0):
        got = chips.read_chip(scenes[chip.scene], chip, 64, spec)["mask"]
        window = truth(root, chip.scene)[chip.row : chip.row + 64, chip.col : chip.col + 64]
        np.testing.assert_array_equal(got, window)
    bare = spec_of(root, stac=item_collection(root, 2, labels=False))
    with pytest.raises(DatasetError, match="(?s)2 bad scene.*item 'scene-0'.*no labels asset"):
        chips.find_scenes(bare)
    shared = bare.replace(labels=f"{root}/labels.geojson")
    assert len(chips.find_scenes(shared)) == 2
    with pytest.raises(DatasetError, match="(?s)no asset 'visual'.*its assets: image, thumbnail"):
        chips.find_scenes(shared.replace(asset="visual"))
    with pytest.raises(ConfigError, match="--stac lists scenes"):
        TrainConfig(stac=f"{root}/items.json", out=str(tmp_path / "run"))


@pytest.mark.slow
def test_train_from_a_stac_item_collection(tmp_path, ray_local):
    root = str(tmp_path / "stac")
    write_labelled_scenes(root, count=2, scene_size=256, seed=4)
    out = str(tmp_path / "run")
    cfg = TrainConfig(
        stac=item_collection(root, 2),
        layout="scenes",
        val_split="scenes",
        val_fraction=0.5,
        out=out,
        model_options={"base_filters": 4, "depth": 2},
        size=64,
        epochs=2,
        chips_per_epoch=16,
        batch_size=4,
        workers=2,
        max_failures=0,
        augment=AugmentConfig.off(),
    )
    result = train(cfg)
    assert result.epochs_run == 2 and "val_miou" in result.history[-1]
    _, card = saving.load_model(out)
    assert card.input_shape[-1] == 3


@pytest.mark.slow
def test_an_epoch_several_times_the_object_store_streams_within_its_budget():
    """A child process starts Ray with an 80 MiB object store and trains one epoch of 1,664 chips
    (4 bands of uint16, 128 px: 260 MiB loaded) from a 2,048 px scene, while a thread samples the
    store's bytes in use from the raylet every 0.2 s (``memory_summary``). The smallest U-Net:
    the store's figures do not depend on the model, the test's seconds do."""
    from segray.devtools.bench.chips import bench_chips

    tiny = {"base_filters": 4, "depth": 2}
    (row,) = bench_chips(
        (1,), 2048, chips=1664, store_mib=80, model_options=tiny, echo=lambda line: None
    )
    assert row["streamed_mib"] > 3 * row["store_mib"]
    assert 0 < row["store_peak_mib"] <= row["in_flight_mib"] + 8, row


def test_scene_labels_travel_as_a_reference_once_shared(one_scene, ray_local):
    import pickle

    import ray

    spec = spec_of(one_scene, labels=f"{one_scene}/labels.geojson")
    labels = chips.find_scenes(spec)[0].vector
    burnt = labels.rasterize(0, 0, 256, 256)
    whole = len(pickle.dumps(labels))
    labels.share()
    assert len(pickle.dumps(labels)) < whole / 3  # the boxes and a reference, not the polygons

    @ray.remote
    def burn(shared):
        return shared.rasterize(0, 0, 256, 256), len(shared)

    got, count = ray.get(burn.remote(labels))
    np.testing.assert_array_equal(got, burnt)
    assert count == len(labels) and burnt.any()
