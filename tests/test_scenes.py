"""Scenes off the driver: rasters written band by band, files copied whole, scene tasks at once."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import rasterio
from affine import Affine

from segray.io import storage
from segray.io.rasters import BandWriter

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


def test_band_writer_takes_bands_in_any_order_and_copies_a_cog(tmp_path):
    """Bands of rows land where they belong whatever their order; the copy is a COG with
    nearest overviews, the colour table, tags, nodata and the georeference."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (700, 300), dtype=np.uint8)
    truth[:5] = 255
    palette = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    writer = BandWriter(
        str(tmp_path),
        "mask",
        truth.shape,
        crs=CRS,
        transform=TRANSFORM,
        nodata=255,
        colormap=palette,
        tags={"CLASS_NAMES": '["a", "b", "c"]'},
    )
    edges = [0, 96, 200, 333, 512, 700]
    bands = list(zip(edges, edges[1:], strict=False))
    random.Random(1).shuffle(bands)
    for top, bottom in bands:
        writer.write(top, truth[top:bottom])
    with pytest.raises(ValueError, match="do not fit"):
        writer.write(650, truth[:100])
    cog = writer.cog()
    with rasterio.open(cog) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.overviews(1) and ds.block_shapes[0] == (256, 256)
        assert ds.crs.to_string() == CRS and ds.transform == TRANSFORM and ds.nodata == 255
        assert ds.colormap(1)[2] == (0, 0, 255, 255) and ds.tags()["CLASS_NAMES"]
        np.testing.assert_array_equal(ds.read(1), truth)
        overview = ds.read(1, out_shape=(350, 150))  # nearest: only values that exist
        assert set(np.unique(overview)) <= {0, 1, 2, 255}
    np.testing.assert_array_equal(writer.read(), truth)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_file_copies_a_file_whole(tmp_path, where, request):
    """A file larger than boto3's multipart threshold (8 MiB) is copied whole, in parts on
    S3, never read into memory whole; locally it goes through a temporary file."""
    data = np.random.default_rng(2).integers(0, 256, 9 * 2**20, dtype=np.uint8).tobytes()
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        target = f"{request.getfixturevalue('s3_prefix')}/out/big.bin"
    else:
        endpoint, target = None, str(tmp_path / "out" / "big.bin")
    storage.write_file(target, str(source), endpoint=endpoint)
    assert storage.read_bytes(target, endpoint=endpoint) == data
    if where == "local":
        assert os.listdir(tmp_path / "out") == ["big.bin"]


def test_stale_scene_folders_are_removed_and_live_ones_kept(tmp_path):
    """A killed scene task's folder goes; one whose files were written lately stays, as does
    anything else in the temporary directory."""
    from segray.bulk.scenes import TEMP_PREFIX, remove_stale_folders

    old, live = tmp_path / f"{TEMP_PREFIX}old", tmp_path / f"{TEMP_PREFIX}live"
    for folder in (old, live):
        folder.mkdir()
        (folder / "mask.tif").write_bytes(b"x")
    other = tmp_path / "unrelated"
    other.mkdir()
    hour_ago = time.time() - 3600
    for path in (old, old / "mask.tif", live, other):
        os.utime(path, (hour_ago, hour_ago))
    assert remove_stale_folders(str(tmp_path), time.time() - 60) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{TEMP_PREFIX}live", "unrelated"]


# --- scene tasks ---------------------------------------------------------------------------------

SCENE, WINDOW = 384, 128


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    import keras

    from segray.models import build_model, saving

    keras.utils.set_random_seed(0)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (WINDOW, WINDOW, 3), **options)
    card = saving.ModelCard(
        name="unet", num_classes=2, input_shape=(WINDOW, WINDOW, 3), options=options
    )
    folder = str(tmp_path_factory.mktemp("scene-model") / "model")
    saving.save_model(model, card, folder)
    return folder


@pytest.mark.slow
def test_scenes_run_at_once_in_tasks_and_a_broken_one_leaves_nothing(
    tiny_model, tmp_path, ray_local
):
    """Scene tasks at once: Ray's timeline shows them running side by side; each mask is a
    whole COG in its scene's georeference; a scene whose blocks break halfway gets an error row
    naming the window, with no mask and no temporary file left behind."""
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.bulk.manifest import read_manifest
    from segray.devtools import synth

    root = tmp_path / "in"
    synth.write_collection(str(root), layout="scene", count=3, scene_size=SCENE, mode="binary")
    scenes = root / "scenes"
    good = (scenes / "scene_000.tif").read_bytes()
    (scenes / "scene_009.tif").write_bytes(good[: len(good) // 2])  # header fine, blocks not
    out = tmp_path / "out"
    config = PredictConfig(
        model=tiny_model,
        input=str(scenes),
        output=str(out),
        pattern="scene_???.tif",
        scene=True,
        overlap=32,
        batch_size=2,
        scenes_at_once=4,
        max_error_rate=0.5,
    )
    started = time.time()
    result = predict(config)
    assert result.counts == {"ok": 3, "skipped": 0, "error": 1}, result.summary()
    rows = {os.path.basename(r["input_uri"]): r for r in read_manifest(result.manifest).to_pylist()}
    broken = rows.pop("scene_009.tif")
    assert "scene_009.tif" in broken["error"] and "cannot read window" in broken["error"]
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in ray_local.timeline()
        if e.get("cat") == "task::stitch_scene" and e["ts"] / 1e6 >= started
    )
    assert len(spans) == 4  # one task per scene, the broken one too
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    for name, row in rows.items():
        with rasterio.open(scenes / name) as src, rasterio.open(row["output_uri"]) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
            mask = ds.read(1)
        assert set(np.unique(mask)) <= {0, 1} and row["status"] == "ok"
        np.testing.assert_allclose(
            row["class_fractions"], np.bincount(mask.ravel(), minlength=2) / mask.size
        )
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    masks = ["scene_000.tif", "scene_001.tif", "scene_002.tif"]
    items = [name.replace(".tif", ".json") for name in masks]  # their STAC items
    assert written == sorted([*masks, *items, "collection.json"])
