"""A multi-node Ray cluster on one machine, for tests and benchmarks that lose a node.

Each node is ``ray start --block`` in its own session (process group), so killing the group takes
its raylet, object store and every worker with it, as a reclaimed spot instance would. The head
runs with Ray 2.60's token authentication; every client on this machine reaches it with
``RAY_AUTH_MODE=token`` (:meth:`LocalCluster.env`), which reads ``~/.ray/auth_token``.

    with LocalCluster(temp, head_cpus=1) as cluster:
        a = cluster.add_node(num_cpus=4, resources={"node_a": 1})
        ...  # run a job with RAY_ADDRESS=cluster.address
        cluster.kill(a)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segray.devtools.ports import free_port

BIN = Path(sys.executable).parent


@dataclass
class Node:
    """One ``ray start --block`` process group; ``name`` is also a custom resource it holds."""

    name: str
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A head and worker nodes on 127.0.0.1, every port chosen free (another Ray may be running)."""

    def __init__(self, temp: Path, head_cpus: float = 1, env: dict[str, str] | None = None):
        self.temp = Path(temp)
        self.head_cpus = head_cpus
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[Node] = []
        # Ray's Unix sockets live under --temp-dir and their paths must stay under 108 bytes, which
        # a pytest tmp_path often exceeds: the session folder is a short one of its own
        self.ray_temp = tempfile.mkdtemp(prefix="segray-ray-")

    @property
    def address(self) -> str:
        """The GCS address drivers join (``ray.init(address=…)``, ``RAY_ADDRESS``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL, for ``ray job submit`` and the state API."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment of a process on this machine that talks to the cluster."""
        path = f"{BIN}:{os.environ.get('PATH', '')}"
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return {**base, "PATH": path, "RAY_AUTH_MODE": "token", **self.extra_env}

    def _ports(self) -> list[str]:
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    def _start(self, name: str, args: list[str]) -> Node:
        log = open(self.temp / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the node
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args, *self._ports()],
            env=self.env(),
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        node = Node(name, process)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 180) -> LocalCluster:
        """Start the head and wait until its dashboard counts it.

        A port chosen free can be taken before Ray binds it (the tests' own Ray starts workers on
        random ports), which leaves a head whose dashboard never answers (seen once in CI): a head
        that dies or stays silent for ``timeout`` is stopped and started once more on fresh ports.
        """
        self.temp.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            head = self._start(
                "head",
                [
                    "--head",
                    f"--port={self.port}",
                    f"--num-cpus={self.head_cpus}",
                    "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    f"--temp-dir={self.ray_temp}",
                    f"--resources={json.dumps({'head': 1})}",
                ],
            )
            try:
                self.wait_nodes(1, timeout, while_alive=head)
                return self
            except TimeoutError:
                if attempt:
                    raise
                self.nodes.remove(head)
                self.kill(head)  # its whole process group: GCS, dashboard, raylet
                shutil.rmtree(self.ray_temp, ignore_errors=True)
                self.ray_temp = tempfile.mkdtemp(prefix="segray-ray-")
                self.port, self.dashboard_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def add_node(
        self,
        name: str,
        num_cpus: float = 2,
        resources: dict[str, float] | None = None,
        timeout: float = 120,
    ) -> Node:
        """Start a worker node holding ``num_cpus`` and the custom resource ``name`` (1), and wait
        until the cluster counts it."""
        held = {name: 1, **(resources or {})}
        args = [
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1",
            f"--resources={json.dumps(held)}",
        ]
        # one node at a time: `ray start` gives its raylet 30 s to register, which two nodes
        # starting together on two busy cores can miss; a start that gave up is tried once more
        for _attempt in range(2):
            node = self._start(name, args)
            if self._joined(node, timeout):
                return node
            self.nodes.remove(node)
            self.kill(node)
        raise TimeoutError(f"node {name} did not join within {timeout:.0f} s; see {name}.log")

    def _joined(self, node: Node, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and node.alive():
            try:
                if any(node.name in (n.get("resources_total") or {}) for n in self.alive_nodes()):
                    return True
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            time.sleep(1)
        return False

    def kill(self, node: Node) -> None:
        """Lose ``node`` at once, as a lost machine would (:func:`kill_tree`)."""
        kill_tree(node.process.pid)
        node.process.wait()

    def state(self, what: str = "nodes", *filters: str) -> list[dict[str, Any]]:
        """``ray list <what>`` as dicts (the state API over the dashboard), e.g. ``"actors"``."""
        cmd = [str(BIN / "ray"), "list", what, "--address", self.dashboard, "--format", "json"]
        cmd += ["--limit", "1000"]
        for f in filters:
            cmd += ["--filter", f]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"ray list {what}: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout or "[]")

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]

    def wait_nodes(
        self, count: int, timeout: float = 120, while_alive: Node | None = None
    ) -> list[dict[str, Any]]:
        """Wait until exactly ``count`` nodes are alive (the dead ones noticed by the GCS), and no
        longer than ``while_alive``'s process lives."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline and (while_alive is None or while_alive.alive()):
            try:
                alive = self.alive_nodes()
                if len(alive) == count:
                    return alive
                last = [n.get("resources_total") for n in alive]
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                last = exc
            time.sleep(1)
        log = self.temp / f"{(while_alive or self.nodes[0]).name}.log" if self.nodes else None
        tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
        raise TimeoutError(
            f"{count} alive nodes expected within {timeout:.0f} s; last: {last}\n{log}:\n{tail}"
        )

    def node_names(self) -> dict[str, str]:
        """Ray's ``node_id`` → this cluster's node name (the custom resource each node holds)."""
        names = {}
        for n in self.state("nodes"):
            held = n.get("resources_total") or {}
            names[n["node_id"]] = next((nd.name for nd in self.nodes if nd.name in held), "?")
        return names

    def stop(self) -> None:
        """Kill every node: a test cluster keeps nothing worth a graceful stop, which takes
        ``ray start --block`` some 30 s a node."""
        for node in reversed(self.nodes):
            if node.alive():
                self.kill(node)
        shutil.rmtree(self.ray_temp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def kill_tree(pid: int) -> None:
    """SIGKILL to the process group ``pid`` leads and to every process under it (the raylet gives
    each worker a process group of its own)."""
    doomed = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in doomed:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(root: int) -> list[int]:
    """Every process under ``root`` (from /proc's parent ids), children first found first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
