"""Serve on a real multi-node Ray cluster on this machine (a head and two worker nodes, each its own
``ray start`` process group): two replicas on two nodes lose one node under a bounded load, and an
autoscaling deployment adds replicas under load and removes them after."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from segray.devtools import synth
from segray.devtools.cluster import LocalCluster
from segray.devtools.ports import free_port
from segray.io import imagery, storage
from segray.models import saving

SIZE = 64
REQUEST_TIMEOUT = 60  # a request that takes longer has hung


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    import keras

    from segray.models import build_model

    root = tmp_path_factory.mktemp("serve-cluster-model")
    keras.utils.set_random_seed(3)
    options = {"base_filters": 8, "depth": 2}
    card = saving.ModelCard(
        name="unet", num_classes=2, input_shape=(SIZE, SIZE, 3), options=options, dtype="uint8"
    )
    model = build_model("unet", 2, (SIZE, SIZE, 3), **options)
    saving.save_model(model, card, str(root), storage.filesystem(str(root)))
    return str(root)


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path / "cluster", head_cpus=0) as c:
        c.add_node("node_a", num_cpus=2)
        c.add_node("node_b", num_cpus=2)
        c.wait_nodes(3)
        yield c


BODY = imagery.encode_png(synth.generate_tile(SIZE, 1, "binary")[0])


def serve(cluster: LocalCluster, model: str, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``segray serve`` joined to the cluster, its proxy on the head only; returns it and its URL
    once it answers a segmentation."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "segray"), "serve", "--model", model]
    cmd += ["--port", str(port), "--proxy-location", "HeadOnly", *args]
    env = {**cluster.env(), "RAY_ADDRESS": cluster.address}
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, (
            "segray serve did not answer: " + log.read_text()[-3000:]
        )
        try:
            if requests.post(f"{url}/v1/segment", data=BODY, timeout=30).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(1)


def replicas(cluster: LocalCluster, names: dict[str, str] | None = None) -> dict[str, int]:
    """Alive replicas of the segmentation deployment per node name (``names``: node ids' names,
    looked up when not given)."""
    names = names if names is not None else cluster.node_names()
    found: dict[str, int] = {}
    for actor in cluster.state("actors"):
        if "SegmentModel" in (actor.get("class_name") or "") and actor.get("state") == "ALIVE":
            name = names.get(actor.get("node_id"), "?")
            found[name] = found.get(name, 0) + 1
    return found


class Load:
    """``clients`` threads posting one tile each, one request at a time, until stopped; records
    (start, end, outcome) with outcome the HTTP status or the exception's name."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.clients = url, clients
        self.records: list[tuple[float, float, int | str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                response = session.post(
                    f"{self.url}/v1/segment", data=BODY, timeout=(5, REQUEST_TIMEOUT)
                )
                outcome: int | str = response.status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
                time.sleep(0.2)
            with self._lock:
                self.records.append((start, time.monotonic(), outcome))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT + 10)

    def ok_between(self, a: float, b: float) -> int:
        with self._lock:
            return sum(1 for _, end, outcome in self.records if outcome == 200 and a <= end < b)


@pytest.mark.slow
def test_serve_loses_the_node_of_one_of_two_replicas_under_load(cluster, model, tmp_path):
    process, url = serve(cluster, model, tmp_path / "serve.log", "--replicas", "2")
    try:
        deadline = time.monotonic() + 120
        while len(placed := replicas(cluster)) < 2 or sum(placed.values()) < 2:
            assert time.monotonic() < deadline, f"two replicas on two nodes: {placed}"
            time.sleep(2)
        assert set(placed) == {"node_a", "node_b"}, placed
        with Load(url, clients=4) as load:
            time.sleep(20)
            killed = time.monotonic()
            cluster.kill(next(n for n in cluster.nodes if n.name == "node_a"))
            # Serve starts a replacement on the node left; load goes on until it serves
            deadline = killed + 150
            while replicas(cluster).get("node_b", 0) < 2:
                assert time.monotonic() < deadline, f"no replacement replica: {replicas(cluster)}"
                time.sleep(2)
            back = time.monotonic()
            time.sleep(15)
        records = list(load.records)
    finally:
        process.terminate()
        process.wait(timeout=60)
    before = load.ok_between(killed - 15, killed) / 15
    assert before > 0, records[-20:]
    failed = [(s - killed, e - s, o) for s, e, o in records if o != 200]
    hung = [r for r in failed if r[2] in ("ReadTimeout", "Timeout")]
    assert not hung, hung  # no request hangs
    # errors only for what the lost node held: at most one request per client was in flight
    assert len(failed) <= load.clients, failed
    assert all(start < 5 for start, _, _ in failed), failed
    # throughput back: the first 3 s window after the loss at 0.7 x the rate before it
    recovered = next(
        (
            t / 2
            for t in range(0, 2 * 150)
            if load.ok_between(killed + t / 2, killed + t / 2 + 3) >= 0.7 * before * 3
        ),
        None,
    )
    after = load.ok_between(back, back + 15) / 15
    print(
        f"\nserve node loss: {len(records)} requests, {len(failed)} failed {failed}; "
        f"{before:.1f} req/s before, {after:.1f} after; throughput back after {recovered} s, "
        f"replacement replica alive {back - killed:.1f} s after the loss"
    )
    assert recovered is not None, "throughput never came back"
    assert after >= 0.5 * before


@pytest.mark.slow
def test_serve_autoscales_out_under_load_and_back_in_after(cluster, model, tmp_path):
    args = ["--replicas", "1", "--max-replicas", "3", "--max-batch-size", "2"]
    args += ["--target-ongoing-requests", "1", "--upscale-delay-s", "2"]
    args += ["--downscale-delay-s", "10"]
    process, url = serve(cluster, model, tmp_path / "serve.log", *args)
    trace: list[tuple[float, int]] = []
    try:
        start, names = time.monotonic(), cluster.node_names()

        def sample() -> int:
            count = sum(replicas(cluster, names).values())
            trace.append((time.monotonic() - start, count))
            return count

        deadline = time.monotonic() + 60
        while sample() != 1:
            assert time.monotonic() < deadline, f"one replica at the start: {trace}"
            time.sleep(1)
        with Load(url, clients=6) as load:
            deadline = time.monotonic() + 120
            while sample() < 3:
                assert time.monotonic() < deadline, f"no scale-out under load: {trace}"
                time.sleep(1)
            loaded_until = time.monotonic()
            time.sleep(5)
            sample()
        idle = time.monotonic()
        deadline = idle + 120
        while sample() > 1:
            assert time.monotonic() < deadline, f"no scale-in after the load: {trace}"
            time.sleep(2)
        records = list(load.records)
    finally:
        process.terminate()
        process.wait(timeout=60)
    failed = [o for _, _, o in records if o != 200]
    assert not failed, failed[:10]  # scaling in and out drops no request
    out_s = next(t for t, n in trace if n >= 3)
    in_s = next(t for t, n in trace if n == 1 and t > idle - start)
    latency = statistics.median(e - s for s, e, _ in records)
    print(
        f"\nautoscaling trace (s, replicas): {[(round(t, 1), n) for t, n in trace]}; "
        f"3 replicas {out_s:.1f} s into the load, back to 1 {in_s - (idle - start):.1f} s after "
        f"it ended; {len(records)} requests, median {latency * 1000:.0f} ms, none failed; "
        f"load ran {loaded_until - start:.1f} s"
    )
