"""Training progress shown on the driver: rank 0 posts where it is to a small Ray actor, the driver
reads it while ``trainer.fit()`` runs and draws the bars; no worker output has to reach it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from segray.log import progress

log = logging.getLogger("segray.train")
#: Seconds between two looks at the board.
POLL_SECONDS = 0.5


@ray.remote(num_cpus=0)
class Board:
    """The latest position of a run: epoch, step, steps per epoch, and each finished epoch's row."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "steps": 0, "rows": []}

    def step(self, epoch: int, step: int, steps: int) -> None:
        """Rank 0 finished ``step`` of ``steps`` in ``epoch``."""
        self.state.update(epoch=epoch, step=step, steps=steps)

    def epoch(self, row: dict[str, float]) -> None:
        """Rank 0 finished an epoch with these metrics."""
        self.state["rows"].append(row)

    def read(self) -> dict[str, Any]:
        """Everything posted so far."""
        return self.state


class StepPoster:
    """Fire-and-forget step progress from a worker to the board, at most one post per
    ``every`` seconds (the driver looks no more often) and always the epoch's last step: a call
    per step would cost the step's process and the board's a Ray call each, on the same cores."""

    def __init__(
        self, board: Any, every: float = POLL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.board, self.every, self.clock, self.last = board, every, clock, -float("inf")

    def __call__(self, epoch: int, step: int, steps: int) -> bool:
        """Post ``step`` of ``steps`` when it is time; True when it was posted."""
        if self.board is None:
            return False
        now = self.clock()
        if step < steps and now - self.last < self.every:
            return False
        self.last = now
        self.board.step.remote(epoch, step, steps)
        return True


def post_epoch(board: Any, row: dict[str, float]) -> None:
    """Fire-and-forget epoch metrics from a worker (no-op without a board)."""
    if board is not None:
        board.epoch.remote(row)


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """One line of an epoch's metrics."""
    val = ""
    if "val_miou" in row:
        val = f", val loss {row['val_loss']:.4f}, val mIoU {row['val_miou']:.3f}"
    if "val_iou_1" in row and "val_iou_2" not in row:  # two classes: the positive one
        val += f", val IoU 1 {row['val_iou_1']:.3f}"
        if "val_threshold" in row:
            val += f" at {row['val_threshold']:.2f}"
    speed = f"{row['img_per_s']:.0f} img/s"
    return f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}{val}, {speed}"


def follow(
    board: Any,
    runner: threading.Thread,
    epochs: int,
    on_epochs: Callable[[list[dict[str, float]]], None] | None = None,
) -> None:
    """Draw an epoch bar and a step bar from the board until ``runner`` (the fit) ends; each
    finished epoch is one log line where no bar is drawn (the bar's postfix shows it otherwise),
    and the new epochs' rows go to ``on_epochs`` (experiment tracking)."""
    seen = 0
    with progress(epochs, "epochs", "epoch") as epoch_bar, progress(None, "steps", "step") as steps:
        bars = not epoch_bar.disable
        while runner.is_alive():
            runner.join(POLL_SECONDS)
            try:
                state = ray.get(board.read.remote(), timeout=5)
            except Exception:  # the board is only for show: never fail the run over it
                continue
            steps.total = state["steps"] or None
            steps.n = state["step"]
            steps.refresh()
            for row in state["rows"][seen:]:
                # a line per epoch where no bar is drawn (logs, `ray job`), else the bar's postfix
                log.log(logging.DEBUG if bars else logging.INFO, epoch_line(row, epochs))
                epoch_bar.n = int(row["epoch"])
                epoch_bar.set_postfix_str(_postfix(row))
            if on_epochs is not None and state["rows"][seen:]:
                on_epochs(state["rows"][seen:])
            seen = len(state["rows"])


def _postfix(row: dict[str, float]) -> str:
    val = f" val mIoU {row['val_miou']:.3f}" if "val_miou" in row else ""
    return f"loss {row['loss']:.4f}{val}"
