"""A run's history for people: ``metrics.csv`` (one row per epoch) and ``curves.png``."""

from __future__ import annotations

import csv
import io


def history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    keys = list(history[0]) if history else ["epoch"]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def plot_curves(history: list[dict[str, float]], monitor: str | None = None) -> bytes:
    """``curves.png``: training and validation loss, and validation mean IoU (and the monitored
    class's IoU or F1), per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="loss")
    if history and "val_loss" in history[0]:
        ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
        ax2.plot(epochs, [h["val_miou"] for h in history], "o-", color="C2", label="val mIoU")
    if monitor and monitor.startswith("val_") and monitor != "val_miou" and history:
        if monitor in history[0] and monitor != "val_loss":
            ax2.plot(epochs, [h[monitor] for h in history], "o-", color="C3", label=monitor)
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
