"""Training on a real multi-node Ray cluster on this machine (a head and two worker nodes, each its
own ``ray start`` process group): one Ray Train worker per node, one node lost mid-epoch, the node
back a little later, and the run resumes from its last checkpoint with no epoch lost or repeated."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segray.devtools import synth
from segray.devtools.cluster import LocalCluster
from segray.log import NATIVE_LINE
from segray.train import checkpoints

EPOCHS = 6


@pytest.fixture
def cluster(tmp_path):
    # 3 CPUs a node and 2 a worker: one worker per node, one CPU left for the feed's reads
    with LocalCluster(tmp_path / "cluster", head_cpus=0) as c:
        c.add_node("node_a", num_cpus=3)
        c.add_node("node_b", num_cpus=3)
        c.wait_nodes(3)
        yield c


@pytest.mark.slow
def test_training_loses_a_node_mid_epoch_and_resumes_from_its_last_checkpoint(cluster, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    synth.write_collection(str(data), count=48, size=32, mode="binary", seed=7)
    cmd = [str(Path(sys.executable).parent / "segray"), "train", "--data", str(data)]
    cmd += ["--out", str(out), "--model", "unet", "--classes", "2", "--size", "32"]
    cmd += ["--epochs", str(EPOCHS), "--batch-size", "4", "--workers", "2"]
    cmd += ["--cpus-per-worker", "2", "--model-option", "base_filters=4"]
    cmd += ["--model-option", "depth=2", "--max-failures", "2"]
    env = {**cluster.env(), "RAY_ADDRESS": cluster.address}
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115
    job = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not checkpoints.complete_checkpoints(str(out)):
            assert job.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.5)
        time.sleep(1.0)  # into the next epoch
        saved = [c.rsplit("/", 1)[-1] for c in checkpoints.complete_checkpoints(str(out))]
        assert job.poll() is None and len(saved) < EPOCHS, "the run ended before the loss"
        killed = time.monotonic()
        cluster.kill(next(n for n in cluster.nodes if n.name == "node_b"))
        time.sleep(10)  # the run waits for two workers' room
        cluster.add_node("node_b", num_cpus=3)
        back = time.monotonic()
        rc = job.wait(timeout=600)
        finished = time.monotonic()
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    text = (tmp_path / "train.log").read_text()
    assert rc == 0, text[-4000:]
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # none lost or repeated
    newest = checkpoints.complete_checkpoints(str(out))[0]
    last = checkpoints.read_state(checkpoints.checkpoint_from_uri(newest))
    assert len(last["starts"]) >= 2, last["starts"]  # the group restarted
    resumed = last["starts"][1]
    assert 1 < resumed <= len(saved) + 2, (last["starts"], saved)
    native = [line for line in text.encode().splitlines() if NATIVE_LINE.match(line)]
    assert not native, native[:5]
    print(
        f"\ntrain node loss: checkpoints {saved} when node_b went; starts {last['starts']}; "
        f"node back {back - killed:.1f} s after, run done {finished - back:.1f} s after that"
    )
