"""``segray tune``: a real Ray Tune search of segray training runs, ASHA stopping trials, a lost
driver resumed, the best trial an ordinary run folder, and nothing left holding the CPUs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from segray import inference
from segray.devtools import synth
from segray.errors import ConfigError
from segray.io import imagery
from segray.models import saving
from segray.train import checkpoints, space
from segray.train import tune as search
from segray.train.config import TrainConfig

FLAGS = ["learning_rate=grid:0.001,0.003,0.03,0.1"]
#: Epochs a trial runs unless ASHA stops it: enough that the driver, lost at a trial's first
#: checkpoint, is lost while that trial still has epochs to go (an epoch here is under a second).
EPOCHS = 5


def test_space_flags_and_files_are_checked():
    doc = space.space_from_flags(["learning_rate=loguniform:1e-4:1e-2", "loss=choice:ce,ce+dice"])
    assert doc == {
        "learning_rate": {"loguniform": [1e-4, 1e-2]},
        "loss": {"choice": ["ce", "ce+dice"]},
    }
    parsed = space.parse_space({**doc, "batch_size": {"grid": [4, 8]}, "epochs": 3})
    assert set(parsed) == {"learning_rate", "loss", "batch_size", "epochs"}
    assert parsed["epochs"] == 3
    with pytest.raises(ConfigError, match="--space 'lr=log:1:2': give KEY=DIST:ARGS"):
        space.space_from_flags(["lr=log:1:2"])
    with pytest.raises(ConfigError, match="'lr' is not a training setting a trial may set"):
        space.parse_space({"lr": {"choice": [1]}})
    with pytest.raises(ConfigError, match="'data' is not a training setting a trial may set"):
        space.parse_space({"data": {"choice": ["a", "b"]}})
    with pytest.raises(ConfigError, match="uniform takes \\[low, high\\]"):
        space.parse_space({"class_balance": {"uniform": [0.1]}})
    with pytest.raises(ConfigError, match="give one of choice, grid"):
        space.parse_space({"class_balance": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="give a search space"):
        space.load_space(None)
    base = TrainConfig(data="d", out="o", workers=2, batch_size=4)
    assert search.concurrency(base, 4.0) == 1 and search.concurrency(base, 12.0) == 4


@pytest.mark.slow
def test_a_search_stops_laggards_resumes_after_its_driver_is_lost_and_keeps_the_best(
    tmp_path, ray_local, mlflow_url
):
    data = str(tmp_path / "tiles")
    synth.write_collection(data, count=16, size=32, mode="binary", seed=5)
    out = tmp_path / "search"
    options = [
        f"--data={data}",
        f"--out={out}",
        "--size=32",
        f"--epochs={EPOCHS}",
        "--batch-size=4",
        "--workers=1",
        "--model-option=base_filters=4",
        "--model-option=depth=2",
        "--val-fraction=0.25",
        "--threshold=0.5",
        "--trials=1",
        "--grace-epochs=1",
        "--reduction-factor=2",
        "--max-concurrent=1",
        f"--tracking-uri={mlflow_url}",
        "--experiment=segray-tune",
    ]
    command = [str(Path(sys.executable).with_name("segray")), "tune", *options]
    command += [f"--space={flag}" for flag in FLAGS]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = out / "trials"
    deadline = time.monotonic() + 300
    # the driver is lost once a trial has a checkpoint, with epochs to go
    while not any(checkpoints.has_checkpoints(str(t), None) for t in _folders(trials)):
        assert driver.poll() is None, "the search ended before it could be interrupted"
        assert time.monotonic() < deadline, "no trial reached its first checkpoint"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    interrupted = {t.name for t in _folders(trials)}
    base = _base(data, out).replace(tracking_uri=mlflow_url, experiment="segray-tune")
    with pytest.raises(ConfigError, match="already holds a search: pass --resume"):
        search.tune(base, search.TuneConfig(trials=1), FLAGS)
    from ray._private import state as ray_state

    actors_before = set(ray_state.actors())

    result = search.tune(
        base,
        search.TuneConfig(
            trials=1, grace_epochs=1, reduction_factor=2, max_concurrent=1, resume=True
        ),
        FLAGS,
    )
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["learning_rate"] for r in rows} == {
        "0.001",
        "0.003",
        "0.03",
        "0.1",
    }
    assert interrupted <= {r["trial"] for r in rows}  # the interrupted trials went on
    starts = []
    for trial in _folders(trials):
        newest = checkpoints.complete_checkpoints(str(trial), None)[0]
        state = checkpoints.read_state(checkpoints.checkpoint_from_uri(newest, None))
        starts.append(state["starts"])
    assert any(len(s) > 1 for s in starts), starts  # one went on from its own checkpoint
    epochs = [int(r["epochs"]) for r in rows]
    assert max(epochs) == EPOCHS and sum(epochs) < 4 * EPOCHS  # ASHA stopped one trial early
    assert {r["state"] for r in rows if int(r["epochs"]) < EPOCHS} == {"stopped"}
    scores = [float(r["val_iou_1"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and result.best["trial"] == rows[0]["trial"]
    # the best trial is an ordinary run folder that prediction takes as it is
    best = out / "best"
    model, card = saving.load_model(str(best))
    assert f"learning_rate: {float(rows[0]['learning_rate'])}" in (best / "config.yaml").read_text()
    mlm = json.loads((best / "mlm.json").read_text())  # its STAC MLM item, as every run's
    assert mlm["properties"]["mlm:hyperparameters"]["threshold"] == card.threshold
    image = imagery.decode((Path(data) / "images" / "tile_00000.png").read_bytes())
    x = inference.prepare(image, card)[None]
    assert inference.render(inference.infer(model, x, card), card).shape == (1, 32, 32)
    # no trial left Ray Train's workers holding CPUs
    ray = ray_local
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)
    # the trials ran on the Ray this process started: Ray Train's local settings reached them
    # (no preemption watcher, an actor of its own per run, on a machine nothing drains)
    new = {a["ActorClassName"] for k, a in ray_state.actors().items() if k not in actors_before}
    assert "TrainController" in new and "PreemptionWatcher" not in new, new
    assert np.isfinite(result.best["best"])
    # tracked: every trial a run (Ray Tune's MLflow logger), the best one registered with its files
    assert result.mlflow_model == "segray-tune/1"
    model = requests.get(
        f"{mlflow_url}/api/2.0/mlflow/registered-models/get",
        params={"name": "segray-tune"},
        timeout=30,
    ).json()["registered_model"]
    run_id = model["latest_versions"][0]["run_id"]
    run = requests.get(
        f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30
    ).json()["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["segray.trial"] == result.best["trial"]
    experiment_id = run["info"]["experiment_id"]
    runs = requests.post(
        f"{mlflow_url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id]},
        timeout=30,
    ).json()["runs"]
    assert len(runs) >= 4 + 1  # the trials, and the best


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _base(data: str, out: Path) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=str(out),
        size=32,
        epochs=EPOCHS,
        batch_size=4,
        workers=1,
        model_options={"base_filters": 4, "depth": 2},
        val_fraction=0.25,
        # a fixed threshold: after one epoch on 4 validation tiles the best threshold makes every
        # trial "all target" alike, and ASHA has nothing to tell them apart by
        threshold=0.5,
    )
