"""``segray bench tune``: what a recipe search buys on held-out real tiles, and what ASHA saves.

Per dataset, on the tiles and fixed held-out blocks of ``segray bench accuracy``, three sides:

- ``default``: ``segray train`` with its defaults (the search's base), one worker;
- ``asha``: ``segray tune`` of ``trials`` trials over the space file, ASHA stopping laggards;
- ``to-end``: the same trials (the same seed draws the same settings) each run to its last epoch.

Each side's model (the default run's, each search's ``<out>/best``) scores the held-out blocks
as ``segray eval`` would. The table gives the target's IoU and F1, the epochs all trials trained
together and the wall seconds: ASHA's saving is the epochs and seconds it did not spend, at the
IoU it reached.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from segray.devtools.bench.accuracy import (
    DATASETS,
    check_names,
    cut_tiles,
    load_rows,
    score,
    train_config,
)

#: The bench's search space: the recipe settings that moved the rare class elsewhere.
SPACE: dict[str, Any] = {
    "learning_rate": {"loguniform": [3.0e-4, 3.0e-3]},
    "loss": {"choice": ["ce+dice", "focal+dice", "ce"]},
    "class_balance": {"uniform": [0.0, 1.0]},
    "schedule": {"choice": ["constant", "cosine"]},
    "batch_size": {"choice": [8, 16]},
}
SIDES = ("default", "asha", "to-end")


def run_side(side: str, train_dir: str, out: str, run: Mapping[str, Any]) -> dict[str, Any]:
    """Train one side into ``out``; returns the folder of its model, the epochs all its runs
    trained, its trials, wall seconds and (searches) the best trial's settings and the table."""
    from segray.train.driver import train
    from segray.train.tune import TuneConfig, tune

    options = {"model_options": {"base_filters": run["base_filters"]}}
    cfg = train_config(
        train_dir, out, run["tile"], run["seed"], run["epochs"], run["batch"], 1, **options
    )
    start = time.monotonic()
    if side == "default":
        result = train(cfg)
        return {
            "folder": out,
            "epochs": result.epochs_run,
            "trials": 1,
            "seconds": time.monotonic() - start,
            "settings": {},
            "table": "",
        }
    scheduler = "asha" if side == "asha" else "none"
    search = TuneConfig(
        trials=run["trials"],
        scheduler=scheduler,
        grace_epochs=run["grace"],
        space_file=run["space"],
    )
    found = tune(cfg, search)
    return {
        "folder": f"{out}/best",
        "epochs": sum(int(r["epochs"]) for r in found.rows),
        "trials": len(found.rows),
        "seconds": time.monotonic() - start,
        "settings": (found.best or {}).get("settings", {}),
        "table": found.table(),
    }


def bench_tune(
    datasets: Sequence[str] = ("vegas-roads", "nc-water"),
    sides: Sequence[str] = SIDES,
    trials: int = 16,
    epochs: int = 30,
    grace: int = 4,
    batch: int = 16,
    base_filters: int = 16,
    seed: int = 0,
    space: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every side on every dataset; print and return the table's rows."""
    from segray.models import saving
    from segray.runtime import init_ray

    check_names(datasets, sides, SIDES)
    if min(trials, epochs, grace) < 1:
        raise ValueError("--trials, --epochs and --grace-epochs must be at least 1")
    init_ray(log_to_driver=False)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="segray-bench-tune-") as tmp:
        space_file = Path(tmp) / "space.yaml"
        space_file.write_text(yaml.safe_dump(dict(space or SPACE)))
        for name in datasets:
            data = DATASETS[name]
            train_dir, test_dir = cut_tiles(Path(tmp) / name, data)
            test = load_rows(test_dir, data.tile)
            run = {
                "tile": data.tile,
                "seed": seed,
                "epochs": epochs,
                "batch": batch,
                "base_filters": base_filters,
                "trials": trials,
                "grace": grace,
                "space": str(space_file),
            }
            for side in sides:
                got = run_side(side, train_dir, f"{tmp}/{name}-{side}", run)
                model, card = saving.load_model(got["folder"])
                iou, f1 = score(model, card, test)
                row = {"dataset": name, "side": side, "iou": iou, "f1": f1, **got}
                rows.append(row)
                if got["table"]:
                    echo(f"{name} {side} trials:\n{got['table']}")
                echo(
                    f"  {name} {side}: IoU {iou:.3f} F1 {f1:.3f}, {got['trials']} trial(s), "
                    f"{got['epochs']} epochs, {got['seconds']:.0f} s {_settings(got['settings'])}"
                )
    echo(
        f"\nbench tune: unet base_filters={base_filters}, {epochs} epochs, batch {batch} "
        f"(searched where the space says), {trials} trials, ASHA grace {grace}, seed {seed}"
    )
    for line in table(rows):
        echo(line)
    return {"rows": rows, "table": table(rows)}


def _settings(values: Mapping[str, Any]) -> str:
    text = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    return f"[best: {text}]" if text else ""


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per dataset and side: IoU, F1, their ratio to the default, trials, epochs, seconds, and
    what ASHA saved against the trials run to the end."""
    lines = [
        f"{'dataset':<12} {'side':<8} {'IoU':>6} {'F1':>6} {'x default':>9} {'trials':>6} "
        f"{'epochs':>6} {'seconds':>8}"
    ]
    by = {(r["dataset"], r["side"]): r for r in rows}
    for r in rows:
        default = by.get((r["dataset"], "default"))
        ratio = f"{r['iou'] / default['iou']:.2f}" if default and default["iou"] else "n/a"
        lines.append(
            f"{r['dataset']:<12} {r['side']:<8} {r['iou']:>6.3f} {r['f1']:>6.3f} {ratio:>9} "
            f"{r['trials']:>6} {r['epochs']:>6} {r['seconds']:>8.0f}"
        )
    for (name, side), r in by.items():
        full = by.get((name, "to-end"))
        if side == "asha" and full:
            lines.append(
                f"{name}: ASHA trained {r['epochs'] / max(full['epochs'], 1):.0%} of the epochs "
                f"and took {r['seconds'] / max(full['seconds'], 1e-9):.0%} of the seconds of the "
                f"same trials run to the end, IoU {r['iou']:.3f} against {full['iou']:.3f}"
            )
    return lines
