"""A real multi-node Ray cluster on this machine (a head and two worker nodes, each its own
``ray start`` process group): a bulk job loses the worker node that holds a Predictor actor midway
and still ends with one whole mask and one manifest row per tile."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segray.bulk.manifest import read_manifest, run_folders
from segray.devtools import synth
from segray.devtools.cluster import LocalCluster
from segray.io import imagery, storage
from segray.log import NATIVE_LINE
from segray.models import saving

SIZE, COUNT = 32, 240


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    """A small local model and ``COUNT`` GeoTIFF tiles; returns (model, tiles) paths."""
    import keras

    from segray.models import build_model

    root = tmp_path_factory.mktemp("cluster-data")
    keras.utils.set_random_seed(3)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (SIZE, SIZE, 3), **options)
    card = saving.ModelCard(
        name="unet", num_classes=2, input_shape=(SIZE, SIZE, 3), options=options, dtype="uint8"
    )
    saving.save_model(model, card, str(root / "model"), storage.filesystem(str(root)))
    tiles = root / "tiles"
    tiles.mkdir()
    for i in range(COUNT):
        image, _ = synth.generate_tile(SIZE, synth.tile_seed(5, i), "binary")
        row, col = divmod(i, 16)
        data = imagery.encode_geotiff(image, synth.CRS, synth.grid_transform(row, col, SIZE))
        (tiles / f"t_{row:02d}_{col:02d}.tif").write_bytes(data)
    return str(root / "model"), str(tiles)


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path / "cluster", head_cpus=0) as c:
        c.add_node("node_a", num_cpus=3)
        c.add_node("node_b", num_cpus=3)
        c.wait_nodes(3)
        yield c


def masks(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tif") if not p.name.startswith(".tmp-")]


def predictor_nodes(cluster: LocalCluster) -> tuple[dict[str, int], list]:
    """Alive Predictor actors per node name, and every actor seen (for a failure's message)."""
    names = cluster.node_names()
    actors = cluster.state("actors")
    found: dict[str, int] = {}
    for actor in actors:
        if "Predictor" in (actor.get("class_name") or "") and actor.get("state") == "ALIVE":
            name = names.get(actor.get("node_id"), "?")
            found[name] = found.get(name, 0) + 1
    return found, [
        (a.get("class_name"), a.get("state"), names.get(a.get("node_id"))) for a in actors
    ]


@pytest.mark.slow
def test_bulk_job_loses_the_node_of_a_predictor_and_finishes(cluster, data, tmp_path):
    import rasterio

    model, tiles = data
    out = tmp_path / "masks"
    cmd = [
        str(Path(sys.executable).parent / "segray"),
        "predict",
        "--model",
        model,
        "--input",
        tiles,
    ]
    cmd += ["--output", str(out), "--ray-address", cluster.address, "--concurrency", "2"]
    cmd += ["--batch-size", "2", "--tiles-per-task", "2", "--manifest-flush-s", "0.2"]
    log = open(tmp_path / "job.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    job = subprocess.Popen(cmd, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        # the Predictors' nodes are looked up while the job starts (the state API can lag behind
        # actors that already write masks); the node goes once 20 masks are written
        deadline = time.monotonic() + 240
        holders: dict[str, int] = {}
        seen: list = []
        while len(masks(out)) < 20 or not any(n.startswith("node_") for n in holders):
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no masks or no Predictor on a worker: {seen}"
            if not any(n.startswith("node_") for n in holders):
                holders, seen = predictor_nodes(cluster)
            time.sleep(0.2)
        on_workers = [n for n in holders if n.startswith("node_")]
        victim_name = max(on_workers, key=holders.get)
        victim = next(n for n in cluster.nodes if n.name == victim_name)
        before = len(masks(out))
        assert before < COUNT, "the job ended before the node could be lost"
        killed_at = time.monotonic()
        cluster.kill(victim)
        rc = job.wait(timeout=420)
        finished = time.monotonic()
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    text = (tmp_path / "job.log").read_text()
    assert rc == 0, text[-4000:]
    # Ray's C++ lines on the lost node and its actors reach the screen only with -v
    native = [line for line in text.encode().splitlines() if NATIVE_LINE.match(line)]
    assert not native, native[:5]
    print(
        f"\nnode lost: {victim_name} held {holders}; {before}/{COUNT} masks before; "
        f"job {finished - started:.1f} s, {finished - killed_at:.1f} s after the loss"
    )
    # every tile has exactly one whole mask, readable to its last pixel
    written = sorted(p.name for p in masks(out))
    assert written == sorted(p.name for p in Path(tiles).glob("*.tif"))
    for p in masks(out):
        with rasterio.open(p) as ds:
            assert ds.shape == (SIZE, SIZE) and np.isin(ds.read(1), [0, 1]).all()
    assert not list(out.rglob(".tmp-*"))
    (run,) = run_folders(str(out))
    rows = read_manifest(run).to_pylist()
    assert len(rows) == COUNT and len({r["input_uri"] for r in rows}) == COUNT
    assert all(r["status"] == "ok" for r in rows)
    # a rerun predicts nothing
    again = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    latest = sorted(run_folders(str(out)))[-1]
    assert {r["status"] for r in read_manifest(latest).to_pylist()} == {"skipped"}


def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 120) -> str:
    """``ray job …`` against the cluster's dashboard; retried while its job agent comes up."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", *args]
    deadline = time.monotonic() + 120
    while True:
        proc = subprocess.run(
            cmd, env=cluster.env(), capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        if "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_ray_job_stop_midway_leaves_no_half_mask_and_the_rerun_completes(cluster, data, tmp_path):
    import rasterio

    model, tiles = data
    out = tmp_path / "masks"
    segray = str(Path(sys.executable).parent / "segray")
    args = ["predict", "--model", model, "--input", tiles, "--output", str(out)]
    args += ["--concurrency", "2", "--batch-size", "2", "--tiles-per-task", "2"]
    address = ["--address", cluster.dashboard]
    ray_cli(
        cluster, "submit", *address, "--no-wait", "--submission-id", "bulk-1", "--", segray, *args
    )
    deadline = time.monotonic() + 300
    while len(masks(out)) < 20:
        assert time.monotonic() < deadline, ray_cli(cluster, "logs", *address, "bulk-1")[-3000:]
        time.sleep(0.2)
    ray_cli(cluster, "stop", *address, "bulk-1")
    status = ray_cli(cluster, "status", *address, "bulk-1")
    assert "stopped" in status.lower(), status[-2000:]
    stopped = masks(out)
    assert 0 < len(stopped) < COUNT, f"{len(stopped)} masks: the job was not stopped midway"
    for p in stopped:  # every object under a final name is whole
        with rasterio.open(p) as ds:
            assert ds.shape == (SIZE, SIZE) and np.isin(ds.read(1), [0, 1]).all()
    left = list(out.rglob(".tmp-*"))
    # the rerun, on the same cluster, predicts what is missing and skips what is done
    again = subprocess.run(
        [segray, *args, "--ray-address", cluster.address],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(p.name for p in masks(out)) == sorted(p.name for p in Path(tiles).glob("*.tif"))
    latest = sorted(run_folders(str(out)))[-1]
    rows = read_manifest(latest).to_pylist()
    assert len(rows) == COUNT and len({r["input_uri"] for r in rows}) == COUNT
    assert not list(out.rglob(".tmp-*"))  # what the stopped writers left, swept by the rerun
    done = sum(r["status"] == "skipped" for r in rows)
    assert done >= len(stopped) and {r["status"] for r in rows} <= {"ok", "skipped"}
    print(
        f"\nray job stop: {len(stopped)}/{COUNT} whole masks when stopped, {len(left)} temporary "
        f"files left; the rerun skipped {done} and predicted {COUNT - done}"
    )
