"""Memory and scale: peak RSS of a job's processes, and the planning step at a million keys.

:class:`RssSampler` samples ``/proc`` while a job runs (Linux); :func:`bench_plan` plans a job over
a simulated listing in a fresh process, so that its peak RSS is the planner's alone.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any


def anchor_pool() -> ProcessPoolExecutor:
    """One child process for everything that imports Keras (spawned: no forked Ray state)."""
    return ProcessPoolExecutor(1, mp_context=get_context("spawn"))


# --- planning at scale -------------------------------------------------------------------------


def bench_plan(keys: int = 1_000_000, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The planning step of a job over a simulated listing of ``keys`` tiles: a Parquet URI list
    (s3:// keys under a 1,000-folder prefix) planned against an empty output, in a fresh process
    so its peak RSS is the planner's alone. Returns seconds, peak RSS and bytes per key."""
    with tempfile.TemporaryDirectory() as tmp:
        listing = os.path.join(tmp, "listing.parquet")
        with anchor_pool() as pool:
            pool.submit(_write_listing, listing, keys).result()
        with anchor_pool() as pool:
            figures = pool.submit(_plan_probe, listing, os.path.join(tmp, "out")).result()
    figures["bytes_per_key"] = (figures["peak_mib"] - figures["base_mib"]) * 2**20 / keys
    echo(
        f"planning {keys:,} keys: {figures['seconds']:.1f} s, driver peak RSS "
        f"{figures['peak_mib']:.0f} MiB ({figures['base_mib']:.0f} before; "
        f"{figures['bytes_per_key']:.0f} bytes per key)"
    )
    return figures


def _write_listing(path: str, keys: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = [f"s3://bench/tiles/{i // 1000:04d}/tile_{i:08d}.tif" for i in range(keys)]
    pq.write_table(pa.table({"input_uri": uris}), path)


def _plan_probe(listing: str, out: str) -> dict[str, Any]:
    import resource

    from segray.bulk.config import PredictConfig
    from segray.bulk.plan import plan

    os.makedirs(out)
    config = PredictConfig(model="unused", manifest=listing, input="s3://bench/tiles", output=out)
    base = rss_bytes(os.getpid()) / 2**20
    start = time.perf_counter()
    todo, done = plan(config)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if done or not todo:
        raise RuntimeError(f"planning refused {len(done)} of the simulated keys")
    return {"keys": len(todo), "seconds": seconds, "peak_mib": peak, "base_mib": base}


# --- memory ------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory, sampled every ``interval`` s from ``/proc`` while in the block: this
    process (the driver), and the largest Ray worker process (``ray::`` titles; ``actors`` for
    those titled by a Predictor class; ``by_title`` the largest per title, such as
    ``ray::stitch_scene`` while a worker runs that task)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.driver = self.workers = self.actors = 0
        self.by_title: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.driver = max(self.driver, rss_bytes(os.getpid()))
        for pid, title in ray_processes():
            rss = rss_bytes(pid)
            self.workers = max(self.workers, rss)
            name = title.split(".")[0]  # an actor and its methods as one
            self.by_title[name] = max(self.by_title.get(name, 0), rss)
            if "Predictor" in title:
                self.actors = max(self.actors, rss)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def ray_processes() -> list[tuple[int, str]]:
    """(pid, title) of the Ray worker processes (``ray::…`` titles) this process started: its
    descendants, so that another Ray session on the machine is not counted; all of them when
    it has started none (a driver joined to a running cluster)."""
    found, parents = [], {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read(200).split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if title.startswith("ray::"):
            found.append((int(entry), title))
    me = os.getpid()

    def mine(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == me:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    own = [(pid, title) for pid, title in found if mine(pid)]
    return own or found
