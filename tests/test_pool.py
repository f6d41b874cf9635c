"""Named Predictor pools: a model loaded once on the cluster, used by many jobs.

On the session's local Ray: a tile job and a scene job on a pool write the very masks their own
actors write, a second job reuses the same actors (same process, batches counted on), and a job
on another model version or precision is refused before it writes anything. Across processes, on
a ``ray start`` cluster: ``segray pool start``, two ``segray predict --pool`` jobs, ``list`` and
``stop``. And a Predictor's process imports Keras without scikit-learn or pyplot.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segray.bulk import pool
from segray.bulk.config import PoolConfig, PredictConfig
from segray.bulk.job import predict
from segray.devtools import synth
from segray.devtools.cluster import LocalCluster
from segray.errors import ConfigError
from segray.io import imagery, storage
from segray.models import saving

SIZE, COUNT = 32, 24
SEGRAY = str(Path(sys.executable).parent / "segray")


def _model(root: Path, name: str, seed: int) -> str:
    import keras

    from segray.models import build_model

    keras.utils.set_random_seed(seed)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (SIZE, SIZE, 3), **options)
    card = saving.ModelCard(
        name="unet", num_classes=2, input_shape=(SIZE, SIZE, 3), options=options, dtype="uint8"
    )
    saving.save_model(model, card, str(root / name), storage.filesystem(str(root)))
    return str(root / name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str, str, str]:
    """Two models (different weights, so versions) and ``COUNT`` tiles and 2 scenes."""
    root = tmp_path_factory.mktemp("pool-data")
    first, second = _model(root, "model_a", 3), _model(root, "model_b", 4)
    tiles, scenes = root / "tiles", root / "scenes"
    tiles.mkdir()
    scenes.mkdir()
    for i in range(COUNT):
        image, _ = synth.generate_tile(SIZE, synth.tile_seed(5, i), "binary")
        row, col = divmod(i, 8)
        where = synth.grid_transform(row, col, SIZE)
        (tiles / f"t_{row}_{col}.tif").write_bytes(imagery.encode_geotiff(image, synth.CRS, where))
    for i in range(2):
        image, _ = synth.generate_tile(96, synth.tile_seed(9, i), "binary")
        where = synth.grid_transform(0, i, 96)
        (scenes / f"s{i}.tif").write_bytes(imagery.encode_geotiff(image, synth.CRS, where))
    return first, second, str(tiles), str(scenes)


def _masks(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for path in sorted(out.rglob("*.tif")):
        if ".tmp-" not in path.name and ".uncertainty" not in path.name:
            with rasterio.open(path) as ds:
                found[path.name] = ds.read(1)
    return found


def _job(model: str, inputs: str, out: Path, **extra) -> PredictConfig:
    return PredictConfig(
        model=model, input=inputs, output=str(out), batch_size=4, tiles_per_task=6, **extra
    )


def test_jobs_on_a_pool_write_what_their_own_actors_write(ray_local, data, tmp_path):
    first, second, tiles, scenes = data
    try:
        info = pool.start_pool("unit", PoolConfig(model=first, size=2))
        assert (info.size, info.batches) == (2, 0)
        actors = pool._pool_actors("unit")
        pids = {pool.describe(a)["pid"] for a in actors}

        own = predict(_job(first, tiles, tmp_path / "own"))
        pooled = predict(_job(first, tiles, tmp_path / "pooled", pool="unit"))
        assert own.ok and pooled.ok and pooled.counts.get("ok") == COUNT
        expected, got = _masks(tmp_path / "own"), _masks(tmp_path / "pooled")
        assert len(expected) == COUNT and got.keys() == expected.keys()
        assert all(np.array_equal(expected[k], got[k]) for k in expected)

        # scenes, window by window through the same actors; Monte-Carlo dropout switched per job
        own = predict(_job(first, scenes, tmp_path / "own-scenes", scene=True, window=SIZE))
        pooled = predict(
            _job(first, scenes, tmp_path / "pooled-scenes", scene=True, window=SIZE, pool="unit")
        )
        assert own.ok and pooled.ok
        expected, got = _masks(tmp_path / "own-scenes"), _masks(tmp_path / "pooled-scenes")
        assert len(expected) == 2 and all(np.array_equal(expected[k], got[k]) for k in expected)
        mc = predict(_job(first, tiles, tmp_path / "mc", pool="unit", mc_samples=2))
        assert mc.ok and len(list((tmp_path / "mc").rglob("*.uncertainty.tif"))) == COUNT

        # the same processes served every job, the model loaded once each
        after = [pool.describe(a) for a in pool._pool_actors("unit")]
        assert {a["pid"] for a in after} == pids
        assert sum(a["batches"] for a in after) >= 3 * COUNT // 4
        listed = {p.name: p for p in pool.list_pools()}
        assert listed["unit"].version == saving.load_card(first).version

        # another model version, another precision, an unknown pool: refused, nothing written
        for config, words in [
            (_job(second, tiles, tmp_path / "other", pool="unit"), "version"),
            (_job(first, tiles, tmp_path / "bf16", pool="unit", precision="bf16"), "bf16"),
            (_job(first, tiles, tmp_path / "none", pool="nosuch"), "no pool 'nosuch'"),
        ]:
            with pytest.raises(ConfigError, match=words):
                predict(config)
            assert not Path(config.output).exists()
        with pytest.raises(ConfigError, match="stop it first"):
            pool.start_pool("unit", PoolConfig(model=second))
        assert pool.start_pool("unit", PoolConfig(model=first)).size == 2  # kept as it is
    finally:
        stopped = pool.stop_pool("unit")
    assert stopped == 2 and "unit" not in {p.name for p in pool.list_pools()}
    with pytest.raises(ValueError, match="pool name"):
        PredictConfig(model=first, input=tiles, output=str(tmp_path / "x"), pool="../a b")


def _first_mask_s(cmd: list[str], out: Path, env: dict, log: Path) -> tuple[float, int]:
    """Seconds from the call to the first mask on disk, and the exit status."""
    start = time.monotonic()
    with open(log, "wb") as sink:
        job = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        first = None
        while job.poll() is None or first is None:
            if first is None and any(out.rglob("t_*.tif")):
                first = time.monotonic() - start
            if job.poll() is not None and first is None:
                break
            assert time.monotonic() - start < 300, log.read_text()[-3000:]
            time.sleep(0.05)
        rc = job.wait(timeout=300)
    return (first if first is not None else float("nan")), rc


@pytest.mark.slow
def test_pool_commands_across_processes_on_a_running_cluster(data, tmp_path):
    first, _, tiles, _ = data
    with LocalCluster(tmp_path / "cluster", head_cpus=4) as cluster:
        env, address = cluster.env(), ["--ray-address", cluster.address]
        run = subprocess.run(
            [SEGRAY, "pool", "start", "cli", "--model", first, *address],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "cli: 1 actor(s)" in run.stdout and "--pool cli" in run.stdout
        base = [SEGRAY, "predict", "--model", first, "--input", tiles, *address]
        base += ["--batch-size", "4", "--tiles-per-task", "6"]
        seconds = {}
        on_pool = ["--pool", "cli"]
        for name, extra in [("own", []), ("pool1", on_pool), ("pool2", on_pool)]:
            out = tmp_path / name
            cmd = [*base, "--output", str(out), *extra]
            seconds[name], rc = _first_mask_s(cmd, out, env, tmp_path / f"{name}.log")
            assert rc == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            assert len(_masks(out)) == COUNT
        expected = _masks(tmp_path / "own")
        for name in ("pool1", "pool2"):
            got = _masks(tmp_path / name)
            assert all(np.array_equal(expected[k], got[k]) for k in expected)
        print(f"\nfirst mask after the call: {seconds}")
        listed = subprocess.run(
            [SEGRAY, "pool", "list", *address], env=env, capture_output=True, text=True
        )
        assert "cli: 1 actor(s)" in listed.stdout, listed.stdout + listed.stderr
        stop = subprocess.run(
            [SEGRAY, "pool", "stop", "cli", *address], env=env, capture_output=True, text=True
        )
        assert stop.returncode == 0 and "1 actor(s) stopped" in stop.stdout, stop.stderr
        again = subprocess.run(
            [SEGRAY, "pool", "stop", "cli", *address], env=env, capture_output=True, text=True
        )
        assert again.returncode == 1 and "no pool 'cli'" in again.stderr


def test_a_pool_needs_a_running_cluster(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [SEGRAY, "pool", "list", "--ray-address", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "no running Ray cluster" in run.stderr, run.stderr


def test_a_predictor_imports_keras_without_sklearn_or_pyplot(data, tmp_path):
    first, _, tiles, _ = data
    script = textwrap.dedent(
        f"""
        import sys
        from segray.bulk.config import PredictConfig
        from segray.bulk.predictor import Predictor
        Predictor(PredictConfig(model={first!r}, input={tiles!r}, output="unused"))
        loaded = [m for m in ("keras", "sklearn", "matplotlib.pyplot") if m in sys.modules]
        import sklearn, matplotlib.pyplot  # still importable afterwards
        print(",".join(loaded))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "keras"


@pytest.mark.slow
def test_a_pool_actor_lost_mid_job_restarts_and_every_tile_ends_whole(ray_local, data, tmp_path):
    import threading

    from segray.bulk.manifest import read_manifest, run_folders

    first, _, _, _ = data
    tiles = tmp_path / "many"
    tiles.mkdir()
    image, _ = synth.generate_tile(SIZE, synth.tile_seed(5, 0), "binary")
    count = 160
    for i in range(count):
        where = synth.grid_transform(*divmod(i, 16), SIZE)
        (tiles / f"m{i:03d}.tif").write_bytes(imagery.encode_geotiff(image, synth.CRS, where))
    out = tmp_path / "masks"
    config = PredictConfig(
        model=first, input=str(tiles), output=str(out), batch_size=2, tiles_per_task=2, pool="lost"
    )
    try:
        pool.start_pool("lost", PoolConfig(model=first))
        before = pool.describe(pool._pool_actors("lost")[0])["pid"]
        results: list = []
        job = threading.Thread(target=lambda: results.append(predict(config)))
        job.start()
        deadline = time.monotonic() + 120
        while len(list(out.glob("m*.tif"))) < 10:
            assert time.monotonic() < deadline and job.is_alive(), "no masks"
            time.sleep(0.05)
        written = len(list(out.glob("m*.tif")))
        ray_local.kill(pool._pool_actors("lost")[0], no_restart=False)
        job.join(timeout=300)
        assert not job.is_alive() and results, "the job did not end"
        (result,) = results
        print(f"\nactor killed at {written}/{count} masks: {result.counts}")
        assert written < count, "the job ended before the actor could be lost"
        (run,) = run_folders(str(out))
        rows = read_manifest(run).to_pylist()
        assert len(rows) == count and len({r["input_uri"] for r in rows}) == count
        ok = [r for r in rows if r["status"] == "ok"]
        for row in ok:  # every mask a row calls written is whole
            with rasterio.open(row["output_uri"]) as ds:
                assert ds.read(1).shape == (SIZE, SIZE)
        assert not list(out.rglob(".tmp-*"))
        after = pool.describe(pool._pool_actors("lost")[0])["pid"]
        assert after != before  # restarted, model loaded again
        if len(ok) < count:  # calls past their retries: error rows, done by the rerun
            again = predict(config)
            assert again.counts.get("ok") == count - len(ok)
    finally:
        pool.stop_pool("lost")
    assert len(list(out.glob("m*.tif"))) == count
