"""What the benchmarks share: medians over rounds or seeds, the untrained bench model and its card,
the model's compute ceiling, a Keras epoch timer, the spawned anchor process, and the samplers of
peak resident memory (``/proc``, Linux) and of anything else polled while a job runs.

Only the standard library is imported here at module level; Keras, Ray and segray's models load
where a function needs them.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

S = TypeVar("S", bound="Sampler")

# --- medians over rounds or seeds --------------------------------------------------------------


def medians(runs: Iterable[Sequence[float]]) -> tuple[float, ...]:
    """The median of each position of the runs' tuples: ``[(iou, f1), …]`` → ``(iou, f1)``."""
    rows = list(runs)
    if not rows:
        raise statistics.StatisticsError("no median for empty data")
    return tuple(statistics.median(column) for column in zip(*rows, strict=True))


def median_by_key(runs: Sequence[Mapping[str, float]], keys: Iterable[str]) -> dict[str, float]:
    """The median over the runs of each figure named in ``keys``."""
    return {key: statistics.median(run[key] for run in runs) for key in keys}


# --- the bench model ---------------------------------------------------------------------------


def save_untrained(folder: str, size: int, num_classes: int = 2, **card: Any) -> str:
    """An untrained U-Net on ``size`` px windows of 3 bands saved with its card in ``folder``;
    ``card`` holds more :class:`~segray.models.saving.ModelCard` fields (its ``options`` build
    the model too). Returns ``folder``."""
    from segray.models import build_model, saving

    shape = (size, size, 3)
    model = build_model("unet", num_classes, shape, **card.get("options", {}))
    kept = saving.ModelCard(name="unet", num_classes=num_classes, input_shape=shape, **card)
    saving.save_model(model, kept, folder)
    return folder


def compute_ceiling(model: Any, card: Any, batch_size: int, seconds: float = 5.0) -> float:
    """Images/s of ``inference.infer`` on in-memory batches of ``batch_size`` (after warm-up)."""
    import numpy as np

    from segray import inference

    batch = np.random.default_rng(0).random((batch_size, *card.input_shape), np.float32)
    for _ in range(2):
        inference.infer(model, batch, card)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        inference.infer(model, batch, card)
        runs += 1
    return runs * batch_size / (time.perf_counter() - start)


def model_rate(model_uri: str, seconds: float) -> float:
    """Windows/s of the saved model alone: in-memory batches of a job's ``batch_size``."""
    from segray import inference
    from segray.bulk.config import PredictConfig

    model, card = inference.load(model_uri)
    batch = PredictConfig.model_fields["batch_size"].default
    return compute_ceiling(model, card, batch, seconds)


def epoch_timer(times: list[float]) -> Any:
    """A Keras callback that appends each epoch's seconds to ``times``."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            times.append(time.perf_counter() - self.start)

    return Timer()


def anchor_pool() -> ProcessPoolExecutor:
    """One child process for everything that imports Keras (spawned: no forked Ray state)."""
    return ProcessPoolExecutor(1, mp_context=get_context("spawn"))


# --- samplers ----------------------------------------------------------------------------------


class Sampler:
    """Calls :meth:`sample` every ``interval`` s on a thread of its own while in the block (and
    once more on leaving it where ``final`` is set)."""

    final = True

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self: S) -> S:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.final:
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class RssSampler(Sampler):
    """Peak resident memory, sampled from ``/proc`` while in the block: this process (the
    driver), and the largest Ray worker process (``ray::`` titles; ``actors`` for those titled
    by a Predictor class; ``by_title`` the largest per title, such as ``ray::stitch_scene`` while
    a worker runs that task)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.driver = self.workers = self.actors = 0
        self.by_title: dict[str, int] = {}

    def sample(self) -> None:
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
