"""Scene windows and stitching: exact coverage, exact on agreed fields, no seams; scene masks."""

from __future__ import annotations

import json
import random
import uuid

import numpy as np
import pytest

from segray import inference
from segray.bulk.manifest import read_manifest
from segray.devtools import synth
from segray.errors import ConfigError
from segray.inference import tiling
from segray.io import footprints, imagery, storage
from segray.io.imagery import Tile
from segray.models.saving import ModelCard

SCENE, WINDOW = 256, 128


@pytest.mark.parametrize(
    ("height", "width", "window", "overlap"),
    [
        (256, 256, 128, 64),
        (1000, 700, 512, 64),
        (100, 90, 128, 16),
        (513, 512, 512, 0),
        (7, 9, 3, 1),
    ],
)
def test_windows_cover_the_scene_with_the_overlap(height, width, window, overlap):
    windows = tiling.scene_windows(height, width, window, overlap)
    count = np.zeros((height, width), int)
    for w in windows:
        assert (w.height, w.width) == (min(window, height), min(window, width))
        assert 0 <= w.row and w.row + w.height <= height and 0 <= w.col and w.col + w.width <= width
        count[w.slices] += 1
    assert count.min() >= 1
    for size in (height, width):
        starts = tiling.axis_starts(size, window, overlap)
        assert starts[0] == 0 and starts[-1] + min(window, size) == size  # last flush with the edge
        steps = np.diff(starts)
        assert np.all(steps[:-1] == window - overlap) and np.all(steps <= window - overlap)
    assert len(windows) == len(tiling.axis_starts(height, window, overlap)) * len(
        tiling.axis_starts(width, window, overlap)
    )


def test_bad_geometry_is_refused_with_the_value():
    with pytest.raises(ValueError, match=r"overlap must lie in 0..window-1 \(127\); got 128"):
        tiling.scene_windows(256, 256, 128, 128)
    with pytest.raises(ValueError, match="blend must be one of"):
        tiling.axis_weights(256, 128, 16, "median")


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_weights_are_positive_and_crop_partitions_the_scene(blend):
    weights = tiling.axis_weights(300, 128, 32, blend)
    total = np.zeros(300)
    for start, w in zip(tiling.axis_starts(300, 128, 32), weights, strict=True):
        total[start : start + 128] += w
    assert total.min() > 0
    if blend == "crop":
        np.testing.assert_array_equal(total, 1.0)


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_stitching_an_agreed_field_is_exact_in_any_order(blend):
    height, width, window, overlap = 200, 170, 64, 20
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.stack([np.full_like(yy, 3.25), 0.5 * yy - 0.25 * xx + 7.0], axis=-1)
    pieces = [(w, field[w.slices]) for w in tiling.scene_windows(height, width, window, overlap)]
    random.Random(0).shuffle(pieces)
    out = tiling.stitch(pieces, height, width, window, overlap, blend)
    np.testing.assert_allclose(out, field, rtol=1e-6, atol=1e-5)


def test_stitcher_holds_about_one_window_row_in_row_major_order():
    height, width, window, overlap = 1000, 300, 128, 32
    stitcher = tiling.SceneStitcher(height, width, window, overlap)
    live = 0
    for w in tiling.scene_windows(height, width, window, overlap):
        stitcher.add(w, np.zeros((w.height, w.width, 1), np.float32))
        live = max(live, sum(s[0].shape[0] for s in stitcher._sums.values()))
    assert stitcher.done and not stitcher._sums
    assert live <= window + (window - overlap)


def test_cut_and_join_windows_round_trip():
    array = np.random.default_rng(0).random((50, 70, 2)).astype(np.float32)
    stack, layout = tiling.cut_windows(array, (32, 32), 16)
    assert stack.shape[1:] == (32, 32, 2) and len(stack) == len(layout.windows) == 3 * 4
    np.testing.assert_allclose(tiling.join_windows(stack, layout, "cosine"), array, rtol=1e-6)
    small = array[:20, :24]
    stack, layout = tiling.cut_windows(small, (32, 32), 16)
    assert stack.shape == (1, 32, 32, 2)  # reflect-padded up to the window
    np.testing.assert_array_equal(tiling.join_windows(stack, layout, "linear"), small)
    np.testing.assert_array_equal(stack[0, 20:, :24], small[::-1][1:13])
    # the model's own size, or a size-flexible model: one window as it is
    for window in ((50, 70), None):
        stack, layout = tiling.cut_windows(array, window, 16)
        assert stack.shape == (1, 50, 70, 2)
        np.testing.assert_array_equal(tiling.join_windows(stack, layout), array)
    # an overlap above half the window is capped there, so windows still advance
    _, layout = tiling.cut_windows(array, (32, 32), 31)
    assert layout.overlap == 16


@pytest.mark.parametrize("shape", [(50, 70), (20, 24), (32, 32), (300, 129), (64, 65)])
@pytest.mark.parametrize(
    "window, overlap", [((32, 32), 16), ((32, 48), 8), ((32, 32), 31), (None, 0)]
)
def test_window_count_is_what_cut_windows_makes(shape, window, overlap):
    stack, layout = tiling.cut_windows(np.zeros((*shape, 1), np.float32), window, overlap)
    assert tiling.window_count(*shape, window, overlap) == len(stack) == len(layout.windows)


# --- with a real fully convolutional model ----------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    """A tiny U-Net for 128 px windows, and the same weights built for the whole 256 px scene."""
    import keras

    from segray.models import build_model

    keras.utils.set_random_seed(0)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (WINDOW, WINDOW, 3), **options)
    whole = build_model("unet", 2, (SCENE, SCENE, 3), **options)
    whole.set_weights(model.get_weights())
    card = ModelCard(name="unet", num_classes=2, input_shape=(WINDOW, WINDOW, 3), options=options)
    return model, whole, card


@pytest.fixture(scope="module")
def scene_logits(unet):
    model, whole, card = unet
    image, _ = synth.generate_tile(SCENE, 1, "binary")
    x = inference.prepare(Tile(image), card)
    return x, inference.infer(whole, x[None], card)[0]


def window_logits(model, card, x, overlap):
    return [
        (w, inference.infer(model, x[w.slices][None], card)[0])
        for w in tiling.scene_windows(SCENE, SCENE, WINDOW, overlap)
    ]


def receptive_radius(model_whole) -> int:
    base = np.random.default_rng(0).random((1, SCENE, SCENE, 3), np.float32)
    poked = base.copy()
    poked[0, SCENE // 2, SCENE // 2] += 1.0
    changed = np.abs(np.asarray(model_whole(poked)) - np.asarray(model_whole(base)))[0, ..., 0] > 0
    rows, cols = np.nonzero(changed)
    return int(max(np.abs(rows - SCENE // 2).max(), np.abs(cols - SCENE // 2).max()))


def test_crop_stitching_equals_the_whole_scene_when_overlap_covers_the_receptive_field(
    unet, scene_logits
):
    model, whole_model, card = unet
    x, whole = scene_logits
    overlap = 64
    # Each pixel is taken from a window where it lies >= overlap/2 from any inner edge; beyond
    # the receptive radius the window sees exactly what the whole-scene model sees.
    assert receptive_radius(whole_model) <= overlap // 2
    stitched = tiling.stitch(
        window_logits(model, card, x, overlap), SCENE, SCENE, WINDOW, overlap, "crop"
    )
    np.testing.assert_allclose(stitched, whole, atol=1e-5)


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_stitched_scene_equals_each_window_where_only_it_predicts(unet, blend):
    model, _, card = unet
    size, overlap = 320, 32
    image, _ = synth.generate_tile(size, 2, "binary")
    x = inference.prepare(Tile(image), card)
    windows = tiling.scene_windows(size, size, WINDOW, overlap)
    pieces = [(w, inference.infer(model, x[w.slices][None], card)[0]) for w in windows]
    stitched = tiling.stitch(pieces, size, size, WINDOW, overlap, blend)
    cover = np.zeros((size, size), int)
    for w in windows:
        cover[w.slices] += 1
    checked = 0
    for w, logits in pieces:
        alone = cover[w.slices] == 1
        np.testing.assert_allclose(stitched[w.slices][alone], logits[alone], rtol=1e-6, atol=1e-6)
        checked += int(alone.sum())
    assert checked > size * size // 4


def edge_band(windows, size, width=2):
    band = np.zeros((size, size), bool)
    for w in windows:
        for c in (w.col, w.col + w.width):
            if 0 < c < size:
                band[:, max(0, c - width) : c + width] = True
        for r in (w.row, w.row + w.height):
            if 0 < r < size:
                band[max(0, r - width) : r + width, :] = True
    return band


@pytest.mark.parametrize(("blend", "overlap"), [("cosine", 64), ("crop", 64), ("cosine", 32)])
def test_no_seam_differences_along_window_edges_are_no_larger_than_elsewhere(
    unet, scene_logits, blend, overlap
):
    model, _, card = unet
    x, whole = scene_logits

    def edge_and_rest(blend, overlap):
        pieces = window_logits(model, card, x, overlap)
        diff = np.abs(tiling.stitch(pieces, SCENE, SCENE, WINDOW, overlap, blend) - whole)[..., 0]
        band = edge_band([w for w, _ in pieces], SCENE)
        return diff[band].mean(), diff[~band].mean()

    near, rest = edge_and_rest(blend, overlap)
    assert near <= rest + 1e-6, (near, rest)
    # The measure sees a seam where there is one: windows butted together without overlap.
    naive_near, naive_rest = edge_and_rest("crop", 0)
    assert naive_near > 5 * naive_rest


# --- scene masks through the bulk job ---------------------------------------------------------


@pytest.mark.slow
def test_scene_masks_from_s3_equal_whole_scene_and_keep_georeference(unet, s3_endpoint, ray_local):
    """Scene masks, their uncertainty maps and footprints, all in the scene's georeference."""
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.models import saving

    model, whole_model, card = unet
    root = f"s3://segray-test/scene-{uuid.uuid4().hex[:8]}"
    storage.make_bucket(root, endpoint=s3_endpoint)
    synth.write_collection(
        root,
        layout="scene",
        count=2,
        scene_size=SCENE,
        mode="binary",
        fs=storage.S3FileSystem(s3_endpoint),
    )
    storage.write_bytes(f"{root}/scenes/scene_bad.tif", b"II*\x00broken", endpoint=s3_endpoint)
    card = saving.save_model(model, card, f"{root}/model", storage.S3FileSystem(s3_endpoint))
    config = PredictConfig(
        model=f"{root}/model",
        input=f"{root}/scenes",
        output=f"{root}/pred",
        pattern="scene_???.tif",
        endpoint=s3_endpoint,
        scene=True,
        overlap=64,
        blend="crop",
        batch_size=4,
        max_error_rate=0.5,
        mc_samples=2,  # no dropout in this model: one pass, the uncertainty is its entropy
        footprints=1,
    )
    result = predict(config)
    assert result.ok and result.counts == {"ok": 2, "skipped": 0, "error": 1}
    rows = {
        r["input_uri"]: r
        for r in read_manifest(result.manifest, storage.S3FileSystem(s3_endpoint)).to_pylist()
    }
    assert "cannot open scene" in rows[f"{root}/scenes/scene_bad.tif"]["error"]
    for name in ("scene_000", "scene_001"):
        scene_bytes = storage.read_bytes(f"{root}/scenes/{name}.tif", endpoint=s3_endpoint)
        scene = imagery.decode(scene_bytes)
        logits = inference.infer(whole_model, inference.prepare(scene, card)[None], card)
        expected = inference.render(logits, card)[0]
        row = rows[f"{root}/scenes/{name}.tif"]
        assert row["output_uri"] == f"{root}/pred/{name}.tif" and row["status"] == "ok"
        mask, uncertainty = (
            read_geotiff(row[key], scene, s3_endpoint) for key in ("output_uri", "uncertainty_uri")
        )
        # Equal up to float noise between batch sizes: only pixels on the threshold may differ.
        assert np.all((mask == expected) | (np.abs(logits[0, ..., 0]) < 1e-4))
        fractions = inference.class_fractions(expected, 2)
        np.testing.assert_allclose(row["class_fractions"], fractions, atol=1e-3)
        assert row["uncertainty_uri"] == f"{root}/pred/{name}.uncertainty.tif"
        assert uncertainty.max() > 0
        assert row["footprints_uri"] == f"{root}/pred/{name}.geojson"
        doc = json.loads(storage.read_bytes(row["footprints_uri"], endpoint=s3_endpoint))
        assert "crs" not in doc and mask.any()  # RFC 7946: WGS84, reprojected back below
        burnt = footprints.rasterize(doc, mask.shape, scene.transform, crs=scene.crs) == 1
        assert (burnt & (mask == 1)).sum() / (burnt | (mask == 1)).sum() >= 0.95


def read_geotiff(uri: str, like: Tile, endpoint: str) -> np.ndarray:
    """The one uint8 band of a GeoTIFF, checked to be georeferenced like ``like``."""
    import rasterio

    with rasterio.MemoryFile(storage.read_bytes(uri, endpoint=endpoint)) as mem, mem.open() as ds:
        assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.shape == like.array.shape[:2]
        assert ds.crs.to_string() == like.crs and ds.transform == like.transform
        return ds.read(1)


@pytest.mark.parametrize("side", [16, 32, 64, 96, 128, 256, 512])
def test_scene_defaults_work_with_every_model_size(side):
    """With nothing but a model given, a scene job's window and overlap fit each other for
    any model size (a 64 px model once failed: overlap 64 at window 64), and the tile path
    keeps its overlap of 64 (cut windows clamp it to half the window)."""
    from types import SimpleNamespace

    from segray.bulk.config import PredictConfig
    from segray.bulk.job import scene_window
    from segray.inference.tiling import OVERLAP, scene_windows

    config = PredictConfig(model="m", input="in", output="out", scene=True)
    window = scene_window(config, SimpleNamespace(input_shape=(side, side, 3)))
    overlap = config.overlap_for(window)
    assert window == (side, side) and overlap == min(OVERLAP, side // 2)
    covered = np.zeros((3 * side + 5, 2 * side), bool)
    for win in scene_windows(*covered.shape, window, overlap):
        covered[win.slices] = True
    assert covered.all()
    assert config.overlap_for(None) == OVERLAP
    given = config.replace(overlap=side)
    with pytest.raises(ConfigError, match=f"overlap must be smaller than the window.*got {side}"):
        scene_window(given, SimpleNamespace(input_shape=(side, side, 3)))


def test_tiles_per_actor_call_and_windows_per_model_call_are_two_settings():
    from segray.bulk.config import PredictConfig

    config = PredictConfig(model="m", input="in", output="out", batch_size=32)
    assert config.actor_batch() == 32  # tiles of one window fill one model call
    config = config.replace(tiles_per_call=8)
    assert (config.actor_batch(), config.batch_size) == (8, 32)
