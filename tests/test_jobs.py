"""`ray job submit` of both entrypoints against a real local cluster (`ray start --head`).

The cluster runs with Ray 2.60's token authentication: `ray start --head` uses ~/.ray/auth_token
(writing one when there is none), and a client with RAY_AUTH_MODE=token on the same machine reads
it from there. Without RAY_AUTH_MODE=token the client sends no token and gets 401.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segray.devtools import synth
from segray.devtools.cluster import kill_tree
from segray.devtools.ports import free_port
from segray.io import storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def client_env() -> dict[str, str]:
    """The environment of a `ray job submit` client on this machine: venv first, token auth on."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head --block`` on 127.0.0.1 in its own session; killed afterwards."""
    temp = tmp_path_factory.mktemp("ray")
    port, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=4",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        # Every port chosen free: the defaults (the job agent's 52365, …) may be held by another
        # Ray on this machine, such as the test session's own local instance.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    head = subprocess.Popen(
        cmd,
        env=client_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address],
            env=client_env(),
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"the Ray head did not answer on {address}: {probe.stderr[-2000:]}")
    yield address
    kill_tree(head.pid)  # a graceful stop takes `ray start --block` some 30 s
    head.wait(timeout=60)


def run_job(address: str, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit` (blocks, streams the logs); fails the test unless the job SUCCEEDED."""
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": [".venv", "runs", ".git"]}),
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after its dashboard
        proc = subprocess.run(
            cmd, env=client_env(), capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        if "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    return out


@pytest.mark.slow
def test_train_then_batch_predict_jobs(cluster, tmp_path):
    data, tiles = tmp_path / "data", tmp_path / "tiles"
    synth.write_collection(str(data), count=12, size=32, mode="binary")
    synth.write_collection(str(tiles), layout="geotiff", count=4, size=32, mode="binary", seed=9)
    run, masks = tmp_path / "run", tmp_path / "masks"
    logs = run_job(
        cluster,
        "python",
        "jobs/train.py",
        "--data",
        str(data),
        "--classes",
        "2",
        "--size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--model-option",
        "base_filters=4",
        "--model-option",
        "depth=2",
        "--out",
        str(run),
    )
    assert "epoch 2/2" in logs
    assert storage.exists(str(run / "model.keras")) and storage.exists(str(run / "metrics.csv"))
    run_job(
        cluster,
        "python",
        "jobs/batch_predict.py",
        "--model",
        str(run),
        "--input",
        str(tiles / "images"),
        "--output",
        str(masks),
        "--batch-size",
        "4",
    )
    written = storage.list_files(str(masks), suffixes=".tif")
    assert len(written) == 4
