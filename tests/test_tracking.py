"""Experiment tracking against a real MLflow tracking server process (SQLite backend, local
artifact root, 127.0.0.1), read back through its REST API; a server that is down fails nothing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import requests

from segray.devtools import synth
from segray.devtools.ports import free_port
from segray.train import tracking
from segray.train.augment import AugmentConfig
from segray.train.config import TrainConfig
from segray.train.driver import train


def api(url: str, route: str, **params) -> dict:
    answer = requests.get(f"{url}/api/2.0/mlflow/{route}", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.slow
def test_a_tracked_run_is_listed_by_the_server_with_metrics_files_and_model(
    mlflow_url, tmp_path, ray_local
):
    data = str(tmp_path / "tiles")
    synth.write_collection(data, count=12, size=32, mode="binary", seed=5)
    out = str(tmp_path / "run")
    config = TrainConfig(
        data=data,
        out=out,
        model_options={"base_filters": 4, "depth": 2},
        size=32,
        epochs=2,
        batch_size=4,
        workers=1,
        max_failures=0,
        augment=AugmentConfig.off(),
        tracking_uri=mlflow_url,
        experiment="segray-test",
    )
    result = train(config)
    assert result.mlflow_model == "segray-test/1" and f"MLflow: run {result.mlflow_run}" in (
        result.summary()
    )
    experiment = api(mlflow_url, "experiments/get-by-name", experiment_name="segray-test")
    found = requests.post(
        f"{mlflow_url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment["experiment"]["experiment_id"]]},
        timeout=30,
    ).json()["runs"]
    (run,) = found
    assert run["info"]["run_id"] == result.mlflow_run and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model"] == "unet" and params["monitor"] == "val_iou_1"
    assert params["model_options.base_filters"] == "4" and params["augment.hflip"] == "False"
    assert "tracking_uri" in params  # the whole config, as config.yaml has it
    for key in ("loss", "val_iou_1", "val_f1_1", "val_miou"):
        history = api(mlflow_url, "metrics/get-history", run_id=result.mlflow_run, metric_key=key)
        points = sorted((m["step"], m["value"]) for m in history["metrics"])
        assert [s for s, _ in points] == [1, 2], key
        for (_, value), row in zip(points, result.history, strict=True):
            assert value == pytest.approx(row[key], rel=1e-6, abs=1e-9), key
    files = api(mlflow_url, "artifacts/list", run_id=result.mlflow_run)["files"]
    names = {f["path"] for f in files}
    assert {"model.json", "config.yaml", "metrics.csv", "curves.png", "model"} <= names
    inside = api(mlflow_url, "artifacts/list", run_id=result.mlflow_run, path="model")["files"]
    assert {f["path"] for f in inside} == {"model/model.keras", "model/model.json"}
    model = api(mlflow_url, "registered-models/get", name="segray-test")["registered_model"]
    (version,) = model["latest_versions"]
    assert version["run_id"] == result.mlflow_run and version["source"].endswith("/model")
    # the logged card is the run folder's
    card = requests.get(
        f"{mlflow_url}/get-artifact",
        params={"run_id": result.mlflow_run, "path": "model/model.json"},
        timeout=30,
    )
    assert card.status_code == 200 and card.content == Path(out, "model.json").read_bytes()


def test_a_server_that_is_down_or_goes_away_fails_nothing(mlflow_url, caplog):
    closed = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="segray.train"):
        down = tracking.tracker_for(closed, "segray-down", None)
    assert down is not None and down.failed
    assert f"MLflow at {closed} does not answer" in caplog.text
    down.start("r", {"a": 1}, {})
    down.epochs([{"epoch": 1, "loss": 0.5}])
    assert down.run_id is None and down.finish("/nowhere", None, {}) is None
    # a server that answers at the start, then goes away: one warning, then nothing is tried
    live = tracking.tracker_for(mlflow_url, "segray-gone", None)
    live.start("gone", {"model": "unet"}, {})
    assert live.run_id and not live.failed
    live.uri = closed  # as if the server went away
    start = time.monotonic()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segray.train"):
        live.epochs([{"epoch": 1, "loss": 0.5}])
        live.epochs([{"epoch": 2, "loss": 0.4}])
        assert live.finish("/nowhere", None, {}) is None
    assert live.failed and time.monotonic() - start < 60
    assert caplog.text.count("training goes on without tracking") == 1
    assert tracking.tracker_for(None, "x", None) is None  # nothing asked, nothing logged


def test_params_are_flat_text_and_credentials_stay_out_of_messages():
    params = tracking.flat_params(
        {"model": "unet", "augment": {"hflip": True}, "bands": [1, 2], "weights": None}
    )
    assert params == {"model": "unet", "augment.hflip": "True", "bands": "1,2"}
    assert tracking.shown("https://user:secret@mlflow.example/x") == "https://mlflow.example/x"
    assert tracking.shown("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
