"""``segray bench startup``: seconds from the call to a job's first mask, each side a whole process.

A user's job is a process: ``segray predict`` starts, imports, joins or starts Ray, plans,
starts its Predictors (import Keras, load the model) and only then writes masks. Over small jobs
that start is the job. Side by side, on the same tiles and model, each a fresh process timed from
its spawn (the first mask is the first file to appear under the output, polled every 20 ms):

- **from nothing** — ``segray predict`` with no cluster: it starts its own Ray;
- **running cluster** — ``segray predict --ray-address`` on a ``ray start`` cluster (a head on
  this machine, :class:`segray.devtools.cluster.LocalCluster`), the job's own Predictor;
- **pool** — the same with ``--pool``, a pool started once before (``segray pool start``): the
  job loads no model;
- **plain loop** — a Python script: import, load the model, read, predict, write the first tile
  (:func:`segray.devtools.bench.predict._loop_rate`'s loop), the anchor of every ratio.

The three segray sides run once per model runtime (``--runtime keras``, and ``onnx``: the
model's ONNX export in ONNX Runtime, no TensorFlow in the Predictors; ", onnx" in the side's name).

Each figure is the median of ``repeats`` runs, the sides interleaved so that a noisy spell
touches them alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segray.devtools.bench.harness import median_by_key, save_untrained

SIDES = ("from nothing", "running cluster", "pool", "plain loop")
RUNTIMES = ("keras", "onnx")
POOL_NAME = "bench-startup"


def side_names(runtimes: tuple[str, ...] = RUNTIMES) -> list[str]:
    """Every side of a run over ``runtimes``: the segray sides per runtime, the plain loop."""
    segray = [s for s in SIDES if s != "plain loop"]
    named = [s if r == "keras" else f"{s}, {r}" for r in runtimes for s in segray]
    return [*named, "plain loop"]


_LOOP = """
import sys, time
entry = time.perf_counter()
from segray.devtools.bench.predict import _loop_rate
_loop_rate(sys.argv[1], sys.argv[2], sys.argv[3], None, 0)
"""


def _segray() -> str:
    return str(Path(sys.executable).parent / "segray")


def _first_mask(cmd: list[str], out: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; seconds from its spawn to the first mask under ``out`` and to its exit."""
    start = time.monotonic()
    first = None
    with open(log, "wb") as sink:
        process = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while True:
            done = process.poll() is not None
            if first is None and out.exists() and _has_mask(out):
                first = time.monotonic() - start
            if done:
                break
            if time.monotonic() - start > 600:
                process.kill()
                raise RuntimeError(f"{cmd[:2]} ran past 600 s; see {log}")
            time.sleep(0.02)
    end = time.monotonic() - start
    if process.returncode != 0 or first is None:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({process.returncode}): {tail}")
    return {"first_s": first, "end_s": end}


def _has_mask(out: Path) -> bool:
    return any(not p.name.startswith(".tmp-") for p in out.rglob("*.tif"))


def bench_startup(
    tiles: int = 200,
    size: int = 64,
    repeats: int = 3,
    echo: Callable[[str], None] = print,
    runtimes: tuple[str, ...] = RUNTIMES,
) -> dict[str, Any]:
    """Run every side ``repeats`` times over ``tiles`` tiles of ``size`` px with each of
    ``runtimes``; print the table and return ``{"sides": {side: {"first_s", "end_s", "runs"}},
    "tiles", "size"}``."""
    from segray.devtools.bench.predict import write_tiles
    from segray.devtools.cluster import LocalCluster
    from segray.inference.export import ExportConfig, export_model

    names = side_names(runtimes)
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in names}
    with tempfile.TemporaryDirectory(prefix="segray-startup-") as tmp:
        root = Path(tmp)
        model, inputs = str(root / "model"), str(root / "tiles")
        save_untrained(model, size)
        if "onnx" in runtimes:
            export_model(ExportConfig(model=model))  # the card names it: --runtime onnx finds it
        write_tiles(inputs, tiles, size)
        echo(f"startup: {tiles} tiles of {size} px, {repeats} runs of each side")
        with LocalCluster(root / "cluster", head_cpus=max(4, os.cpu_count() or 1)) as cluster:
            env = cluster.env()
            address = ["--ray-address", cluster.address]
            for runtime in runtimes:
                pool = [_segray(), "pool", "start", f"{POOL_NAME}-{runtime}", "--model", model]
                started = subprocess.run(
                    [*pool, "--runtime", runtime, *address],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if started.returncode:
                    raise RuntimeError(f"segray pool start failed: {started.stderr[-2000:]}")
            job = [_segray(), "predict", "--model", model, "--input", inputs]
            lone = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
            for k in range(repeats):
                for side in names:
                    out = root / f"out-{k}-{side.replace(' ', '-').replace(',', '')}"
                    log = root / f"{out.name}.log"
                    if side == "plain loop":
                        cmd = [sys.executable, "-c", _LOOP, model, inputs, str(out)]
                        runs[side].append(_first_mask(cmd, out, lone, log))
                        continue
                    where, _, runtime = side.partition(", ")
                    runtime = runtime or "keras"
                    cmd = [*job, "--output", str(out), "--runtime", runtime]
                    if where != "from nothing":
                        cmd += address
                    if where == "pool":
                        cmd += ["--pool", f"{POOL_NAME}-{runtime}"]
                    runs[side].append(_first_mask(cmd, out, lone, log))
                    written = sum(not p.name.startswith(".tmp-") for p in out.rglob("*.tif"))
                    if written != tiles:
                        raise RuntimeError(f"{side}: {written} masks of {tiles}; see {log}")
                    echo(f"  run {k + 1} {side}: first mask {runs[side][-1]['first_s']:.2f} s")
    sides = {
        side: {**median_by_key(found, ("first_s", "end_s")), "runs": found}
        for side, found in runs.items()
    }
    result = {"sides": sides, "tiles": tiles, "size": size, "repeats": repeats}
    echo(format_report(result))
    return result


def format_report(result: dict[str, Any]) -> str:
    sides = result["sides"]
    anchor = sides["plain loop"]["first_s"]
    lines = [
        f"| {result['tiles']} × {result['size']} px, median of {result['repeats']} | first mask "
        "(s) | vs the plain loop's | whole process (s) |",
        "|---|---:|---:|---:|",
    ]
    for side in sides:
        s = sides[side]
        lines.append(
            f"| {side} | {s['first_s']:.2f} | {s['first_s'] / anchor:.2f}× | {s['end_s']:.2f} |"
        )
    return "\n".join(lines)
