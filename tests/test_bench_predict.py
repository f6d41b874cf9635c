"""``segray bench predict``: the job, the plain loop and the model alone on the same tiles."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from segray.devtools import synth
from segray.devtools.bench import predict as bench
from segray.io import imagery, storage


def test_steady_rate_starts_after_the_first_fifth_of_rows():
    # 100 rows: 30 arrive at t=10 (start-up), then 10 rows a second from t=10 to t=17
    arrivals = [(10.0, 30)] + [(10.0 + i, 10) for i in range(1, 8)]
    assert bench.steady_rate(arrivals, fewest=2) == pytest.approx(70 / 7)
    # too few arrivals (blocks queued during start-up would inflate the rate): none
    assert np.isnan(bench.steady_rate(arrivals))
    assert np.isnan(bench.steady_rate([(3.0, 100)], fewest=1))


def test_same_masks_refuses_a_loop_mask_that_differs(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    for name in ("loop", "job"):
        storage.write_bytes(str(tmp_path / name / "a" / "t.tif"), imagery.encode_geotiff(mask))
    assert bench.same_masks(str(tmp_path / "loop"), str(tmp_path / "job"), None) == 1
    mask[3, 3] = 1
    storage.write_bytes(str(tmp_path / "job" / "a" / "t.tif"), imagery.encode_geotiff(mask))
    with pytest.raises(RuntimeError, match="differs"):
        bench.same_masks(str(tmp_path / "loop"), str(tmp_path / "job"), None)


def test_write_tiles_lays_them_on_the_collection_grid(tmp_path):
    bench.write_tiles(str(tmp_path), 5, 16)
    names = storage.list_files(str(tmp_path), suffixes=(".tif",))
    assert len(names) == 5
    tile = imagery.decode(storage.read_bytes(names[-1]), names[-1])
    assert tile.array.shape == (16, 16, 3) and tile.crs == synth.CRS
    # the 5th tile sits in row 1, column 1 of a 3-column grid
    assert tile.transform == synth.grid_transform(1, 1, 16)


@pytest.mark.slow
def test_bench_predict_measures_job_loop_and_model_side_by_side(ray_local):
    lines: list[str] = []
    result = bench.bench_predict(
        ((32, 40),),
        s3=True,
        rss_tiles=(20, 40),
        repeats=1,
        loop_tiles=10,
        model_seconds=0.3,
        echo=lines.append,
    )
    assert [r["storage"] for r in result["rates"]] == ["local", "s3"]
    for r in result["rates"]:
        assert r["tiles"] == 40 and r["job"] > 0 and r["loop"] > 0 and r["model"] > 0
        assert r["job_vs_loop"] == pytest.approx(r["job"] / r["loop"])
        # the loop like the job pays its start: over the job's 40 tiles it is slower than its flow
        assert r["loop_start_s"] > 0 and r["loop"] < r["loop_steady"]
        assert r["loop"] == pytest.approx(40 / (r["loop_start_s"] + 40 / r["loop_steady"]))
        assert r["steady_vs_loop"] == pytest.approx(r["steady"] / r["loop_steady"], nan_ok=True)
        assert r["job_vs_model"] == pytest.approx(r["job"] / r["model"])
    assert [r["tiles"] for r in result["rss"]] == [20, 40]
    for run in result["rss"]:
        # the Predictor actor holds Keras and the model: it is one of the Ray workers sampled
        assert 100 < run["actor_mib"] <= run["worker_mib"] and run["driver_mib"] > 50
    report = "\n".join(lines)
    assert "S3 → S3 / local at 32 px" in report and "driver peak RSS" in report
    assert os.environ.get("AWS_ACCESS_KEY_ID")  # the session's credentials are left in place


def test_bench_plan_plans_every_simulated_key_in_a_fresh_process():
    from segray.devtools.bench.scale import bench_plan

    lines: list[str] = []
    figures = bench_plan(2000, echo=lines.append)
    assert figures["keys"] == 2000 and figures["seconds"] > 0
    assert figures["peak_mib"] >= figures["base_mib"] > 0
    assert "planning 2,000 keys" in lines[0]


def test_rss_sampler_sees_this_process():
    from segray.devtools.bench.harness import RssSampler, rss_bytes

    with RssSampler(interval=0.01) as sampler:
        block = np.ones(32 * 2**20, np.uint8)  # 32 MiB more while sampled
        time.sleep(0.05)
    assert sampler.driver >= rss_bytes(os.getpid()) - 2**20 and sampler.driver > block.size


def test_harness_medians_take_each_position_and_each_key():
    from statistics import StatisticsError

    from segray.devtools.bench.harness import median_by_key, medians

    # (IoU, F1) of three seeds: the median of each position, not of each seed's pair
    assert medians([(0.5, 0.9), (0.1, 0.7), (0.3, 0.2)]) == (0.3, 0.7)
    # an even count: the mean of the two middle values
    assert medians([(1.0, 4.0), (3.0, 2.0)]) == (2.0, 3.0)
    with pytest.raises(StatisticsError):
        medians([])
    rounds = [
        {"rps": 10.0, "p50_ms": 5.0},
        {"rps": 30.0, "p50_ms": 1.0},
        {"rps": 20.0, "p50_ms": 9.0},
    ]
    assert median_by_key(rounds, ("rps", "p50_ms")) == {"rps": 20.0, "p50_ms": 5.0}
    assert median_by_key(rounds[:2], ("rps",)) == {"rps": 20.0}
