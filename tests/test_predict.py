"""Bulk prediction on the moto S3 server and a real local Ray: masks, manifest, resumability."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from segray import inference
from segray.bulk.config import PredictConfig
from segray.bulk.job import predict
from segray.bulk.manifest import (
    Manifest,
    PredictResult,
    fallback_folder,
    read_manifest,
    run_folders,
)
from segray.bulk.plan import common_base, plan
from segray.devtools import synth
from segray.errors import ConfigError
from segray.io import imagery, storage
from segray.models import saving
from segray.models.saving import ModelCard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, COUNT = 32, 200


# --- fixtures: a tiny model and a tile collection on S3, made once ----------------------------


@pytest.fixture(scope="module")
def s3_root(s3_endpoint) -> str:
    uri = f"s3://segray-test/predict-{uuid.uuid4().hex[:8]}"
    storage.make_bucket(uri, endpoint=s3_endpoint)
    return uri


@pytest.fixture(scope="module")
def model_uri(s3_root, s3_endpoint) -> str:
    import keras

    from segray.models import build_model

    keras.utils.set_random_seed(1)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (SIZE, SIZE, 3), **options)
    card = ModelCard(
        name="unet",
        num_classes=2,
        input_shape=(SIZE, SIZE, 3),
        class_names=["background", "building"],
        options=options,
        dtype="uint8",
    )
    saving.save_model(model, card, f"{s3_root}/model", storage.S3FileSystem(s3_endpoint))
    return f"{s3_root}/model"


@pytest.fixture(scope="module")
def collection(s3_root, s3_endpoint) -> tuple[str, dict]:
    """200 synthetic GeoTIFF tiles on a grid in EPSG:32633, written in parallel; returns their
    prefix and ``{relative path: Tile}`` as written."""
    images = f"{s3_root}/data/images"
    columns = int(np.ceil(np.sqrt(COUNT)))

    def write(index: int) -> tuple[str, imagery.Tile]:
        image, _ = synth.generate_tile(SIZE, synth.tile_seed(0, index), "binary")
        row, col = divmod(index, columns)
        transform = synth.grid_transform(row, col, SIZE)
        rel = f"tile_r{row:03d}_c{col:03d}.tif"
        data = imagery.encode_geotiff(image, synth.CRS, transform)
        storage.write_bytes(f"{images}/{rel}", data, endpoint=s3_endpoint)
        return rel, imagery.Tile(image, rel, "tiff", synth.CRS, transform)

    with ThreadPoolExecutor(8) as pool:
        return images, dict(pool.map(write, range(COUNT)))


@pytest.fixture(scope="module")
def tiles(collection) -> str:
    return collection[0]


@pytest.fixture(scope="module")
def expected(collection, model_uri, s3_endpoint) -> dict:
    """``{relative path: (tile, mask, logits)}``: the model applied directly to every tile."""
    model, card = saving.load_model(model_uri, storage.filesystem(model_uri, s3_endpoint))
    rel, decoded = zip(*sorted(collection[1].items()), strict=True)
    logits = inference.infer(model, np.stack([inference.prepare(t, card) for t in decoded]), card)
    masks = inference.render(logits, card)
    return {r: (t, m, lg) for r, t, m, lg in zip(rel, decoded, masks, logits, strict=True)}


def config(model_uri, tiles, out, endpoint, **kw) -> PredictConfig:
    return PredictConfig(model=model_uri, input=tiles, output=out, endpoint=endpoint, **kw)


def objects(prefix: str, endpoint: str) -> dict[str, tuple[str, object]]:
    """Mask objects under ``prefix`` (manifests and STAC documents left out): key -> (ETag,
    LastModified)."""
    loc = storage.parse(prefix)
    pages = storage.s3_client(endpoint).get_paginator("list_objects_v2")
    found = {}
    for page in pages.paginate(Bucket=loc.bucket, Prefix=loc.path + "/"):
        for obj in page.get("Contents", []):
            if "/_manifest/" not in obj["Key"] and not obj["Key"].endswith(".json"):
                found[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return found


def assert_masks_correct(out: str, expected: dict, endpoint: str) -> None:
    """Every tile has one readable mask equal to the direct prediction, with its georeference."""
    import rasterio

    for rel, (tile, mask, logits) in expected.items():
        data = storage.read_bytes(storage.join(out, rel), endpoint=endpoint)
        with rasterio.MemoryFile(data) as mem, mem.open() as ds:
            assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.shape == (SIZE, SIZE)
            assert ds.crs.to_string() == tile.crs and ds.transform == tile.transform
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            # a GIS shows the classes in the palette of every picture, and knows their names
            assert ds.colormap(1)[1][:3] == inference.PALETTE[1]
            assert json.loads(ds.tags()["CLASS_NAMES"]) == ["background", "building"]
            got = ds.read(1)
        # Equal up to float noise between batch sizes: only pixels on the threshold may differ.
        assert np.all((got == mask) | (np.abs(logits[..., 0]) < 1e-4)), rel


# --- the main path ------------------------------------------------------------------------------


@pytest.mark.slow
def test_200_geotiff_tiles_then_a_rerun_skips_all_and_rewrites_nothing(
    model_uri, tiles, expected, s3_root, s3_endpoint, ray_local
):
    out = f"{s3_root}/out-main"
    cfg = config(model_uri, tiles, out, s3_endpoint, batch_size=32)
    start = time.monotonic()
    result = predict(cfg)
    print(f"{COUNT} tiles S3->S3 in {time.monotonic() - start:.1f} s")
    assert result.ok and result.counts == {"ok": COUNT, "skipped": 0, "error": 0}
    assert_masks_correct(out, expected, s3_endpoint)
    table = read_manifest(result.manifest, storage.filesystem(out, s3_endpoint))
    # the output took the whole receipt: its local spool is gone
    assert result.manifest.startswith(out) and not os.path.exists(
        fallback_folder(result.manifest.rsplit("/", 1)[-1])
    )
    version = saving.load_card(model_uri, storage.filesystem(model_uri, s3_endpoint)).version
    rows = {storage.relative_to(tiles, r["input_uri"]): r for r in table.to_pylist()}
    assert set(rows) == set(expected) and len(table) == COUNT
    for rel, row in rows.items():
        assert row["status"] == "ok" and row["error"] is None and row["seconds"] > 0
        assert row["output_uri"] == f"{out}/{rel}" and row["model_version"] == version
        fractions = inference.class_fractions(expected[rel][1], 2)
        np.testing.assert_allclose(row["class_fractions"], fractions, atol=1 / SIZE**2 + 1e-9)

    before = objects(out, s3_endpoint)
    assert len(before) == COUNT
    time.sleep(1.1)  # LastModified has a resolution of one second
    again = predict(cfg)
    assert again.ok and again.counts == {"ok": 0, "skipped": COUNT, "error": 0}
    assert objects(out, s3_endpoint) == before
    again_rows = read_manifest(again.manifest, storage.filesystem(out, s3_endpoint)).to_pylist()
    assert [r["status"] for r in again_rows] == ["skipped"] * COUNT
    # skipped rows carry the fractions the run that made their masks measured
    first = {r["input_uri"]: r["class_fractions"] for r in table.to_pylist()}
    assert {r["input_uri"]: r["class_fractions"] for r in again_rows} == first
    assert run_folders(out, storage.filesystem(out, s3_endpoint)) == sorted(
        [result.manifest, again.manifest]
    )


def corrupt_collection(root: str, endpoint: str) -> dict[str, str]:
    """Six good GeoTIFFs, a PNG, a JPEG, a 48 px tile, and one of each kind of bad tile."""
    synth.write_collection(
        root, "geotiff", 6, SIZE, seed=3, mode="binary", fs=storage.filesystem(root, endpoint)
    )
    image, _ = synth.generate_tile(SIZE, 7, "binary")
    good = storage.read_bytes(f"{root}/images/tile_r000_c000.tif", endpoint=endpoint)
    big, _ = synth.generate_tile(48, 8, "binary")
    files = {
        "images/extra/photo.png": imagery.encode_png(image),
        "images/extra/photo2.jpg": imagery.encode_jpeg(image),
        "images/extra/wide.tif": imagery.encode_geotiff(
            big, synth.CRS, synth.grid_transform(9, 9, 48)
        ),
        "images/bad/zero.tif": b"",
        "images/bad/truncated.tif": good[: len(good) // 2],
        "images/bad/text.tif": b"this is not an image at all",
        "images/bad/one_band.tif": imagery.encode_geotiff(image[..., :1]),
        "images/bad/float64.tif": imagery.encode_geotiff(image.astype(np.float64)),
        "images/bad/sixteen.tif": imagery.encode_geotiff(image.astype(np.uint16) * 250),
    }
    for rel, data in files.items():
        storage.write_bytes(f"{root}/{rel}", data, endpoint=endpoint)
    return {
        "zero.tif": "empty file",
        "truncated.tif": "corrupt or truncated",
        "text.tif": "not an image",
        "one_band.tif": "has 1 band(s) but the model expects 3",
        "float64.tif": "unsupported pixel type float64",
        "sixteen.tif": "has pixel type uint16 but the model was trained on uint8",
    }


def test_bad_tiles_become_error_rows_and_the_rest_is_done(
    model_uri, s3_root, s3_endpoint, ray_local
):
    root = f"{s3_root}/mixed"
    reasons = corrupt_collection(root, s3_endpoint)
    out = f"{root}/pred"
    cfg = config(model_uri, f"{root}/images", out, s3_endpoint, batch_size=4)
    result = predict(cfg)
    assert result.counts == {"ok": 9, "skipped": 0, "error": 6}
    assert not result.ok and result.error_rate == pytest.approx(6 / 15)
    assert dataclasses.replace(result, max_error_rate=0.5).ok
    rows = read_manifest(result.manifest, storage.filesystem(out, s3_endpoint)).to_pylist()
    errors = {r["input_uri"].rsplit("/", 1)[-1]: r for r in rows if r["status"] == "error"}
    assert set(errors) == set(reasons)
    for name, reason in reasons.items():
        assert reason in errors[name]["error"] and errors[name]["output_uri"] is None
    assert "FAILED" in result.summary() and "error:" in result.summary()
    png = imagery.decode(storage.read_bytes(f"{out}/extra/photo.png", endpoint=s3_endpoint))
    jpg = imagery.decode(storage.read_bytes(f"{out}/extra/photo2.png", endpoint=s3_endpoint))
    wide = imagery.decode(storage.read_bytes(f"{out}/extra/wide.tif", endpoint=s3_endpoint))
    assert png.format == jpg.format == "png" and png.shape == (SIZE, SIZE, 1)
    assert wide.shape == (48, 48, 1) and wide.transform == synth.grid_transform(9, 9, 48)
    # without --mc-samples and --footprints nothing is written beside the masks
    assert not [
        k for k in objects(out, s3_endpoint) if k.endswith((".geojson", ".uncertainty.tif"))
    ]
    assert not any(r["uncertainty_uri"] or r["footprints_uri"] for r in rows)

    # --overwrite redoes every tile (a probability map now), bad ones fail again; 5/14 <= 0.5.
    before = objects(out, s3_endpoint)
    redo = predict(
        config(
            model_uri,
            f"{root}/images",
            out,
            s3_endpoint,
            batch_size=4,
            overwrite=True,
            output_mode="probability",
            max_error_rate=0.5,
        )
    )
    assert redo.ok and redo.counts == {"ok": 9, "skipped": 0, "error": 6}
    after = objects(out, s3_endpoint)
    assert set(after) == set(before) and all(after[k][0] != before[k][0] for k in before)


# --- Monte-Carlo uncertainty and footprints beside the masks --------------------------------------


@pytest.fixture(scope="module")
def bayes_uri(tmp_path_factory) -> str:
    """A tiny untrained Bayesian SegNet (Monte-Carlo dropout) at 32x32x3."""
    import keras

    from segray.models import build_model

    keras.utils.set_random_seed(2)
    options = {"base_filters": 4, "depth": 2, "dropout_units": 2}
    model = build_model("bayesian-segnet", 2, (SIZE, SIZE, 3), **options)
    card = ModelCard(
        name="bayesian-segnet",
        num_classes=2,
        input_shape=(SIZE, SIZE, 3),
        class_names=["background", "building"],
    )
    folder = str(tmp_path_factory.mktemp("bayes"))
    saving.save_model(model, card.replace(options=options), folder)
    return folder


def read_band(path, like: imagery.Tile) -> np.ndarray:
    """The one uint8 band of a GeoTIFF, checked to be georeferenced like ``like``."""
    import rasterio

    with rasterio.open(path) as ds:
        assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.shape == like.array.shape[:2]
        assert ds.crs.to_string() == like.crs and ds.transform == like.transform
        if ".uncertainty." in path:  # its meaning and scale travel with it
            assert ds.tags()["SCALE"] == str(1 / 254) and "entropy" in ds.tags()["UNCERTAINTY"]
        return ds.read(1)


def test_mc_samples_and_footprints_write_maps_and_polygons_beside_masks(
    bayes_uri, tmp_path, ray_local
):
    from segray.io import footprints

    images = tmp_path / "in" / "images"
    synth.write_collection(str(tmp_path / "in"), "geotiff", 4, SIZE, seed=5, mode="binary")
    big, _ = synth.generate_tile(48, 9, "binary")
    wide = imagery.encode_geotiff(big, synth.CRS, synth.grid_transform(9, 9, 48))
    (images / "wide.tif").write_bytes(wide)  # windowed: its uncertainty is stitched too
    (images / "photo.png").write_bytes(imagery.encode_png(synth.generate_tile(SIZE, 7)[0]))
    out = tmp_path / "out"
    cfg = PredictConfig(
        model=bayes_uri, input=str(images), output=str(out), mc_samples=4, footprints=1
    )
    result = predict(cfg)
    assert result.ok and result.counts == {"ok": 6, "skipped": 0, "error": 0}
    rows = {
        r["input_uri"].rsplit("/", 1)[-1]: r for r in read_manifest(result.manifest).to_pylist()
    }
    uncertain = burnt_and_mask = 0
    for path in sorted(images.glob("*.tif")):
        tile = imagery.decode(path.read_bytes(), str(path))
        stem = out / path.stem
        row = rows[path.name]
        assert row["uncertainty_uri"] == f"{stem}.uncertainty.tif"
        assert row["footprints_uri"] == f"{stem}.geojson"
        mask = read_band(f"{stem}.tif", tile)
        uncertain += int(read_band(f"{stem}.uncertainty.tif", tile).astype(bool).sum())
        doc = json.loads((out / f"{path.stem}.geojson").read_text())
        assert "crs" not in doc  # RFC 7946: WGS84 longitude, latitude
        burnt = footprints.rasterize(doc, mask.shape, tile.transform, crs=tile.crs) == 1
        iou = (burnt & (mask == 1)).sum() / max(1, (burnt | (mask == 1)).sum())
        assert iou >= 0.95 or not (burnt.any() or (mask == 1).any()), path.name
        burnt_and_mask += int((burnt & (mask == 1)).sum())
    assert uncertain > 0 and burnt_and_mask > 0
    png = imagery.decode((out / "photo.uncertainty.png").read_bytes())
    assert png.format == "png" and png.shape == (SIZE, SIZE, 1)
    assert "crs" not in json.loads((out / "photo.geojson").read_text())  # pixel coordinates

    # Done means every output exists: a missing uncertainty map makes its tile run again.
    (out / "tile_r000_c001.uncertainty.tif").unlink()
    again = predict(cfg)
    assert again.counts == {"ok": 1, "skipped": 5, "error": 0}
    assert (out / "tile_r000_c001.uncertainty.tif").exists()
    skipped = [r for r in read_manifest(again.manifest).to_pylist() if r["status"] == "skipped"]
    assert all(r["uncertainty_uri"] and r["footprints_uri"] for r in skipped)


# --- killed mid-run, then run again -------------------------------------------------------------


def settle(folder, timeout: float = 60.0) -> None:
    """Wait until no temporary file is in ``folder`` and its listing holds still for a second."""
    deadline, before = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        if now == before and not any(p.rsplit("/", 1)[-1].startswith(".tmp-") for p in now):
            return
        before = now
        time.sleep(1.0)
    raise AssertionError(f"{folder} still changing after {timeout} s")


def local_masks(out) -> dict:
    """Finished masks under a local output: path -> (inode, mtime); temp files are not masks."""
    return {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in out.rglob("*.tif")
        if not p.name.startswith(".tmp-")
    }


@pytest.mark.slow
def test_killed_job_rerun_ends_with_every_mask_complete_and_correct(
    model_uri, tiles, expected, s3_endpoint, tmp_path, ray_local
):
    out = tmp_path / "masks"  # local: writes are temp file + rename, the case a kill can tear
    pattern = "tile_r00[0-4]_*"  # 75 of the tiles keep the test short
    subset = {rel: v for rel, v in expected.items() if fnmatch.fnmatch(rel, pattern)}
    args = ["--model", model_uri, "--input", tiles, "--output", str(out), "--pattern", pattern]
    args += ["--s3-endpoint", s3_endpoint, "--batch-size", "2", "--ray-address", "local"]
    args += ["--manifest-flush-s", "0.2", "--tiles-per-task", "2"]  # the receipt follows closely
    job = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "batch_predict.py"), *args],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the job and the Ray it starts share one process group
    )
    try:
        deadline = time.monotonic() + 180
        while len(local_masks(out)) < 10 and job.poll() is None:
            assert time.monotonic() < deadline, "the job wrote no masks in time"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    time.sleep(0.5)
    survivors = local_masks(out)
    assert 10 <= len(survivors) < len(subset), "the job must be killed midway"
    torn = out / ".tmp-killed-tile_r000_c000.tif"  # as a torn write leaves
    torn.write_bytes(b"half a mask")
    os.utime(torn, (time.time() - 120, time.time() - 120))
    live = out / ".tmp-live-tile_r000_c001.tif"  # another writer's, at work right now
    live.write_bytes(b"being written")
    (killed,) = run_folders(str(out))
    finished = {r["input_uri"]: r for r in read_manifest(killed).to_pylist()}
    assert finished and all(r["status"] == "ok" for r in finished.values())

    rerun = config(model_uri, tiles, str(out), s3_endpoint, batch_size=32, pattern=pattern)
    result = predict(rerun)
    assert result.ok and result.counts["error"] == 0
    assert not torn.exists() and live.exists()
    # the rerun's receipt keeps what the killed run measured of the tiles it finished
    rows = {r["input_uri"]: r for r in read_manifest(result.manifest).to_pylist()}
    for uri, row in finished.items():
        assert rows[uri]["status"] == "skipped"
        assert rows[uri]["class_fractions"] == row["class_fractions"] is not None
    assert result.counts["skipped"] == len(survivors)
    assert result.counts["ok"] == len(subset) - len(survivors)
    masks = local_masks(out)
    assert sorted(p.relative_to(out).as_posix() for p in masks) == sorted(subset)
    assert {p: masks[p] for p in survivors} == survivors  # finished masks were left untouched
    assert_masks_correct(str(out), subset, s3_endpoint)


# --- planning, the manifest and the job's options, without Ray -----------------------------------


def test_plan_from_a_uri_list_skips_existing_masks_and_refuses_clashes(tmp_path):
    for name in ("a.tif", "b.png", "sub/c.jpg", "sub/c.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.tif").write_bytes(b"done")
    listing = tmp_path / "list.txt"
    names = ["a.tif"]
    listing.write_text("".join(f"{tmp_path}/in/{n}\n" for n in names))
    cfg = PredictConfig(model="m", manifest=str(listing), output=str(tmp_path / "out"))
    assert plan(cfg)[0] == [(f"{tmp_path}/in/a.tif", f"{tmp_path}/out/a.tif")]  # no STAC item
    (tmp_path / "out" / "a.json").write_text("{}")
    names = ["a.tif", "b.png", "sub/c.jpg", "sub/c.png"]
    listing.write_text("# tiles\n" + "".join(f"{tmp_path}/in/{n}\n" for n in names))
    cfg = PredictConfig(model="m", manifest=str(listing), output=str(tmp_path / "out"))
    todo, done = plan(cfg)
    out = tmp_path / "out"
    assert todo == [
        (f"{tmp_path}/in/b.png", f"{out}/b.png"),
        (f"{tmp_path}/in/sub/c.jpg", f"{out}/sub/c.png"),
    ]
    assert done[0] == (f"{tmp_path}/in/a.tif", f"{out}/a.tif", "")  # its mask exists
    assert "already made from" in done[1][2]
    (tmp_path / "in" / "pred").mkdir()
    (tmp_path / "in" / "pred" / "b.png").write_bytes(b"mask")
    inside = PredictConfig(
        model="m", input=str(tmp_path / "in"), output=str(tmp_path / "in" / "pred")
    )
    inputs = [u for u, _ in plan(inside)[0]] + [u for u, _, _ in plan(inside)[1]]
    assert not any("/pred/" in u for u in inputs) and len(inputs) == 4
    assert common_base(["s3://b/x/1.tif", "s3://b/x/y/2.tif"]) == "s3://b/x"
    with pytest.raises(ValueError, match="several buckets"):
        common_base(["s3://b1/x/1.tif", "s3://b2/x/2.tif"])


def test_an_empty_input_is_an_error_that_says_what_to_check(model_uri, s3_endpoint, tmp_path):
    cfg = PredictConfig(model=model_uri, input=str(tmp_path), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no input found in .*check the URI, --pattern"):
        predict(PredictConfig(**{**vars(cfg), "endpoint": s3_endpoint}))


def test_manifest_parts_are_written_by_time_as_well_as_by_rows(tmp_path):
    manifest = Manifest(str(tmp_path), "model-uri", "v1", rows_per_part=1000, flush_s=0.3)
    manifest.add("a", "ok", output_uri="out/a")
    assert storage.list_files(manifest.uri) == []
    time.sleep(0.35)
    manifest.add("b", "ok", output_uri="out/b")
    assert read_manifest(manifest.uri).column("input_uri").to_pylist() == ["a", "b"]
    manifest.add("c", "ok", output_uri="out/c")
    assert len(storage.list_files(manifest.uri)) == 1  # c waits for its time or the close
    assert read_manifest(manifest.close(1.0).manifest).num_rows == 3


def test_manifest_parts_and_verdict(tmp_path):
    manifest = Manifest(str(tmp_path), "model-uri", "v1", rows_per_part=2)
    manifest.add("a", "ok", output_uri="out/a", class_fractions=[0.25, 0.75], seconds=0.5)
    manifest.add("b", "skipped", output_uri="out/b", uncertainty_uri="out/b.uncertainty.png")
    manifest.add("c", "error", "c: empty file (0 bytes)")
    result = manifest.close(2.0, max_error_rate=0.0)
    table = read_manifest(result.manifest)
    assert len(storage.list_files(result.manifest)) == 2 and table.num_rows == 3
    assert table.column("class_fractions").to_pylist() == [[0.25, 0.75], None, None]
    assert table.column("model_version").to_pylist() == ["v1"] * 3
    assert table.column("uncertainty_uri").to_pylist() == [None, "out/b.uncertainty.png", None]
    assert table.column("footprints_uri").to_pylist() == [None] * 3
    assert not result.ok and PredictResult(result.counts, [], "m", 1.0, 0.34).ok
    assert "c: empty file" in result.summary()


def test_the_receipt_spool_is_a_copy_that_never_costs_a_job(tmp_path, monkeypatch):
    # a spool where the output takes the receipt: gone once it is whole there
    monkeypatch.setenv("SEGRAY_MANIFEST_FALLBACK", str(tmp_path / "spool"))
    manifest = Manifest(str(tmp_path / "out"), "model-uri", "v1", rows_per_part=1)
    manifest.add("a", "ok", output_uri="out/a")
    assert len(storage.list_files(str(tmp_path / "spool"))) == 1
    result = manifest.close(1.0)
    assert result.manifest.startswith(str(tmp_path / "out"))
    assert not storage.list_files(str(tmp_path / "spool"))
    # a spool that cannot be written (a file where its folder should be): a warning, not an error
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("SEGRAY_MANIFEST_FALLBACK", str(tmp_path / "blocked"))
    manifest = Manifest(str(tmp_path / "out"), "model-uri", "v1", rows_per_part=1)
    for name in ("a", "b"):
        manifest.add(name, "ok", output_uri=f"out/{name}")
    assert manifest.inputs() == {"a", "b"}  # read back from the output
    assert read_manifest(manifest.close(1.0).manifest).num_rows == 2


def test_config_refuses_bad_values_and_the_job_maps_every_option():
    with pytest.raises(ConfigError, match="output_mode: Input should be 'classes', 'binary'"):
        PredictConfig(model="m", input="i", output="o", output_mode="logits")
    with pytest.raises(ConfigError, match="max_error_rate: .* less than or equal to 1; got 2"):
        PredictConfig(model="m", input="i", output="o", max_error_rate=2)
    with pytest.raises(ConfigError, match="mc_samples: .* greater than or equal to 0; got -1"):
        PredictConfig(model="m", input="i", output="o", mc_samples=-1)
    from segray.cli import cli
    from segray.cli.options import from_options

    def parse(argv: list[str]) -> PredictConfig:  # the options of `segray predict` and the job
        params = cli.commands["predict"].make_context("p", argv).params
        return from_options(PredictConfig, params)

    cfg = parse(
        "--model m --input i --output o --s3-endpoint http://h:1 --batch-size 8 --concurrency 2 "
        "--gpus-per-actor 0.5 --scene --window 256 --overlap 32 --overwrite --max-error-rate 0.1 "
        "--output-mode binary --threshold 0.3 --class-index 1 --bands 3,2,1 --pattern *.tif "
        "--mc-samples 8 --footprints 1".split()
    )
    assert (cfg.endpoint, cfg.batch_size, cfg.concurrency, cfg.gpus_per_actor) == (
        "http://h:1",
        8,
        2,
        0.5,
    )
    assert (cfg.scene, cfg.window, cfg.overlap, cfg.overwrite) == (True, 256, 32, True)
    assert (cfg.output_mode, cfg.threshold, cfg.bands, cfg.pattern) == (
        "binary",
        0.3,
        (3, 2, 1),
        "*.tif",
    )
    assert (cfg.mc_samples, cfg.footprints) == (8, 1)
    defaults = parse(["--model=m", "--output=o", "--input=i"])
    assert (defaults.mc_samples, defaults.footprints, defaults.overlap) == (0, None, None)
    assert defaults.overlap_for(None) == 64 and defaults.overlap_for((64, 64)) == 32


# --- no input can make a job write outside its output ------------------------------------------


def test_keys_that_climb_out_become_error_rows_and_nothing_is_written_outside(
    model_uri, s3_root, s3_endpoint, tmp_path
):
    inputs = f"{s3_root}/climb/in"
    tile = imagery.encode_geotiff(synth.generate_tile(SIZE, 1, "binary")[0])
    client = storage.s3_client(s3_endpoint)
    bucket, prefix = storage.parse(inputs).bucket, storage.parse(inputs).path
    climbing = [
        f"{prefix}/../../../../../../../../..{tmp_path}/evil.tif",
        f"{prefix}/a/../../x.tif",
    ]
    for key in climbing:  # S3 takes any key: whoever can write the bucket can write these
        client.put_object(Bucket=bucket, Key=key, Body=tile)
    listed = storage.list_files(inputs, endpoint=s3_endpoint)
    assert len(listed) == 2 and all(".." in uri for uri in listed)

    out = tmp_path / "out" / "masks"
    result = predict(
        PredictConfig(model=model_uri, input=inputs, output=str(out), endpoint=s3_endpoint)
    )
    assert result.counts == {"ok": 0, "skipped": 0, "error": 2}
    table = read_manifest(result.manifest).to_pylist()
    assert all("would leave the output" in row["error"] for row in table), table
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(str(p).startswith(str(out / "_manifest")) for p in written), written


def test_a_listed_file_outside_the_input_is_an_error_row_not_the_end_of_the_job(
    model_uri, s3_endpoint, tmp_path
):
    inside, outside = tmp_path / "in", tmp_path / "elsewhere"
    for folder in (inside, outside):
        folder.mkdir()
    (outside / "x.png").write_bytes(b"not read")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{outside / 'x.png'}\n")
    config = PredictConfig(
        model=model_uri,
        input=str(inside),
        manifest=str(listing),
        output=str(tmp_path / "out"),
        endpoint=s3_endpoint,
    )
    result = predict(config)
    assert result.counts["error"] == 1
    (row,) = read_manifest(result.manifest).to_pylist()
    assert "not under the input" in row["error"] and str(outside / "x.png") in row["error"]


def test_links_in_a_local_input_are_reported_and_not_followed(model_uri, s3_endpoint, tmp_path):
    inputs, secret = tmp_path / "in", tmp_path / "secret"
    inputs.mkdir()
    secret.mkdir()
    (secret / "s.png").write_bytes(imagery.encode_png(np.zeros((SIZE, SIZE, 3), np.uint8)))
    os.symlink(secret, inputs / "folder-link")
    os.symlink(secret / "s.png", inputs / "file-link.png")
    out = tmp_path / "out"
    result = predict(
        PredictConfig(model=model_uri, input=str(inputs), output=str(out), endpoint=s3_endpoint)
    )
    rows = {row["input_uri"]: row for row in read_manifest(result.manifest).to_pylist()}
    assert set(rows) == {str(inputs / "folder-link"), str(inputs / "file-link.png")}
    assert all("symbolic link" in row["error"] for row in rows.values())
    assert not (out / "file-link.png").exists() and not (out / "folder-link").exists()


@pytest.mark.slow
def test_an_s3_outage_during_the_job_costs_time_not_tiles(
    model_uri, tiles, expected, s3_root, s3_endpoint, ray_local
):
    from outage import OutageProxy

    # the first tile read by a worker takes S3 down for 5 s: every connection refused
    key = storage.parse(tiles).path
    proxy = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]), f"GET /segray-test/{key}/".encode(), 5)
    out = f"{s3_root}/out-outage"
    try:
        result = predict(config(model_uri, tiles, out, proxy.endpoint, batch_size=32))
    finally:
        proxy.close()
    assert proxy.tripped_at is not None
    assert result.counts == {"ok": COUNT, "skipped": 0, "error": 0}, result.summary()
    assert_masks_correct(out, expected, s3_endpoint)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for about 60 masks (mounting needs root, as this project's machines
    and CI have; elsewhere the test says why it cannot run)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_an_output_that_takes_no_more_writes_stops_the_job_with_its_receipt(
    fault, model_uri, tiles, expected, s3_endpoint, small_disk, tmp_path, monkeypatch, ray_local
):
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    monkeypatch.setenv("SEGRAY_MANIFEST_FALLBACK", str(tmp_path / "receipts"))
    result = predict(config(model_uri, tiles, str(small_disk), s3_endpoint, batch_size=16))
    why = "No space left on device" if fault == "disk full" else "Read-only file system"
    assert not result.ok and why in result.stopped and str(small_disk) in result.stopped
    summary = result.summary()
    assert "STOPPED" in summary and str(tmp_path / "receipts") in summary
    # the receipt was written where it could be, and says exactly what was done
    assert result.manifest.startswith(str(tmp_path / "receipts"))
    rows = read_manifest(result.manifest).to_pylist()
    done = {storage.relative_to(tiles, r["input_uri"]) for r in rows if r["status"] == "ok"}
    settle(small_disk)  # write tasks under way when the job stopped end (land or clean up)
    masks = {p.relative_to(small_disk).as_posix() for p in local_masks(small_disk)}
    assert done <= masks  # every mask the receipt calls done is there
    # a write task still under way when the job stopped may land after the receipt (a rerun
    # then lists it as skipped); at most a batch or two, and every mask there is whole
    assert len(masks - done) <= 32
    assert 0 < len(done) < COUNT if fault == "disk full" else not masks
    assert_masks_correct(str(small_disk), {rel: expected[rel] for rel in masks}, s3_endpoint)
    assert not [p for p in small_disk.rglob(".tmp-*")]  # no torn write left behind


@pytest.mark.slow
def test_an_output_bucket_lost_mid_job_stops_it_with_its_whole_receipt_in_the_fallback(
    model_uri, s3_endpoint, tmp_path, monkeypatch, ray_local
):
    """The probe's fault: the S3 server of the output killed once masks were written, a new empty
    one on the same port (the bucket is gone)."""
    import threading

    from segray.devtools.s3server import MotoServer

    inputs = tmp_path / "in"
    synth.write_collection(str(inputs), count=240, size=SIZE, mode="binary", seed=3)
    model = str(tmp_path / "model")
    loaded, card = saving.load_model(model_uri, storage.filesystem(model_uri, s3_endpoint))
    saving.save_model(loaded, card, model)
    monkeypatch.setenv("SEGRAY_MANIFEST_FALLBACK", str(tmp_path / "receipts"))
    first = MotoServer().start()
    out = "s3://lost/masks"
    storage.make_bucket(out, endpoint=first.endpoint)
    seen: list[str] = []
    second: list[MotoServer] = []

    def lose_the_bucket() -> None:
        while len(seen) < 15:
            seen[:] = [k for k in objects(out, first.endpoint) if k.endswith(".png")]
            time.sleep(0.05)
        first.stop()
        second.append(MotoServer(port=first.port).start())

    killer = threading.Thread(target=lose_the_bucket, daemon=True)
    killer.start()
    try:
        cfg = config(model, f"{inputs}/images", out, first.endpoint, batch_size=4)
        result = predict(cfg.replace(tiles_per_task=4))
    finally:
        killer.join(60)
        for server in (first, *second):
            server.stop()
    assert second, "the job ended before its bucket could be lost"
    assert not result.ok and "NoSuchBucket" in result.stopped, result.summary()
    summary = result.summary()
    assert "STOPPED" in summary and str(tmp_path / "receipts") in summary
    # the whole receipt is in the fallback folder: every mask seen written before the fault
    assert result.manifest.startswith(str(tmp_path / "receipts"))
    rows = read_manifest(result.manifest).to_pylist()
    done = {r["output_uri"] for r in rows if r["status"] == "ok"}
    assert {f"s3://lost/{key}" for key in seen} <= done
    assert len(rows) == len({r["input_uri"] for r in rows}) and len(rows) < 240


def test_entries_that_are_no_file_are_error_rows_before_anything_opens_them(tmp_path):
    """A named pipe among a folder's tiles once hung a job for ever, and a --manifest line can
    name /dev/zero: the plan refuses each by what it is, the good tiles are planned."""
    from segray.bulk.plan import plan

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png"):
        (inputs / name).write_bytes(imagery.encode_png(np.zeros((SIZE, SIZE, 3), np.uint8)))
    os.mkfifo(inputs / "c.png")
    config = PredictConfig(model="m", input=str(inputs), output=str(tmp_path / "out"))
    todo, done = plan(config)
    assert [i for i, _ in todo] == [str(inputs / "a.png"), str(inputs / "b.png")]
    ((uri, out, reason),) = done
    assert uri == str(inputs / "c.png") and not out and "named pipe (FIFO), not a file" in reason
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs / 'a.png'}\n/dev/zero\n")
    todo, done = plan(config.replace(input="", manifest=str(listing)))
    assert [i for i, _ in todo] == [str(inputs / "a.png")]
    assert done == [
        ("/dev/zero", "", "/dev/zero: a character device, not a file; refused before it is opened")
    ]
