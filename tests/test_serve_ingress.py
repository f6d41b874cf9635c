"""``segray serve`` as a user runs it: its own Ray, HAProxy in front of the replica's own HTTP
server (Serve's throughput mode), real HTTP on 127.0.0.1, stopped with Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from segray import inference
from segray.devtools import synth
from segray.devtools.ports import free_port
from segray.io import imagery
from segray.models import build_model, saving
from segray.serve import ingress
from segray.serve.config import ServeConfig

SIZE = 32
WAIT_S = 3.0  # a batch waits this long to fill: far longer than a lone request may take

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("model"))
    model = build_model("unet", 2, (SIZE, SIZE, 3), base_filters=4, depth=2)
    card = saving.ModelCard(name="unet", num_classes=2, input_shape=(SIZE, SIZE, 3))
    saving.save_model(model, card, folder)
    return folder


def listener(port: int) -> str | None:
    """The name of the process listening on TCP ``port`` (from /proc), if any."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            if links & inodes:
                with open(f"/proc/{pid}/comm") as f:
                    return f.read().strip()
        except OSError:  # gone, or not ours to read
            continue
    return None


def test_a_loopback_server_opens_no_haproxy_page_unless_asked():
    """HAProxy's stats and metrics pages bind every interface (Serve's template): ``auto`` keeps
    Serve's proxy on a loopback host, so nothing but --host:--port listens."""
    for host in ingress.LOOPBACK:
        assert ingress.choose("auto", host) == "proxy" and ingress.environment("auto", host) == {}
    assert ingress.choose("auto", "0.0.0.0") == "haproxy"
    assert ingress.choose("haproxy", "127.0.0.1") == "haproxy"
    assert ServeConfig(model_uri="m").ingress == "auto"


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} not healthy within {timeout} s")


@pytest.mark.skipif(ingress.haproxy_binary() is None, reason="no HAProxy binary installed")
def test_segray_serve_behind_haproxy_batches_only_when_others_wait(model_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    folder = ingress.short_folder()
    env |= ingress.own_haproxy(folder, free_port(), free_port())
    cli = str(Path(sys.executable).parent / "segray")
    args = [cli, "serve", "--model", model_dir, "--port", str(port), "--max-batch-size", "8"]
    args += ["--batch-wait-timeout-s", str(WAIT_S), "--num-cpus", "0.5", "--ingress", "haproxy"]
    # the output goes to a file: a pipe nobody reads fills with the replicas' logs and blocks
    # the process (it then never exits on Ctrl-C)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        assert listener(port) == "haproxy"

        model, card = saving.load_model(model_dir)
        tiles = [imagery.encode_png(synth.generate_tile(SIZE, s, "binary")[0]) for s in range(6)]

        def mask(data: bytes) -> np.ndarray:
            response = requests.post(f"{url}/v1/segment", data=data, timeout=60)
            assert response.status_code == 200, response.text
            return imagery.as_mask(imagery.decode(response.content).array)

        def expected(data: bytes) -> np.ndarray:
            array = inference.prepare(imagery.decode(data), card)
            return inference.render(inference.infer(model, array[None], card), card)[0]

        # alone, a request has nobody to wait for: it does not sit out the batch wait
        mask(tiles[0])
        start = time.perf_counter()
        np.testing.assert_array_equal(mask(tiles[1]), expected(tiles[1]))
        assert time.perf_counter() - start < WAIT_S / 2

        # several at once still share a batch
        before = requests.get(f"{url}/v1/stats", timeout=10).json()["batch_sizes"]
        with ThreadPoolExecutor(len(tiles)) as threads:
            masks = list(threads.map(mask, tiles))
        for data, got in zip(tiles, masks, strict=True):
            np.testing.assert_array_equal(got, expected(data))
        after = requests.get(f"{url}/v1/stats", timeout=10).json()["batch_sizes"]
        new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
        assert sum(k * v for k, v in new.items()) == len(tiles) and max(new) > 1, new
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    # asked for on a loopback host, HAProxy comes with a warning: its pages listen everywhere
    assert "listen on every interface" in log.read_text()
    # Ctrl-C takes HAProxy down with Ray: nothing is left listening on the port
    deadline = time.monotonic() + 30
    while listener(port) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert listener(port) is None
