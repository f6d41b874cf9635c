"""``segray bench serve``: HTTP throughput and latency of the Serve endpoint, against the model.

Each ingress (:mod:`segray.serve.ingress`: HAProxy straight to the replica, Serve's Python proxy)
runs in a child process with its own local Ray, started in that ingress's environment; rounds
alternate between them. In each, a load generator in a third process posts one tile per request
from 1, 4 and 16 threads, with batching on (``max_batch_size`` N) and off (1). The model's compute
ceiling is measured between the rounds, in this process: the same model on in-memory batches of N
through ``inference.infer``. All traffic goes to 127.0.0.1, with bounded request counts and
timeouts. Figures are medians over the rounds.

At C clients each waiting for its answer, the mean latency is C over the throughput (Little's
law), so a p99 at C clients below k times the single-request p50 needs a throughput above
C / (k * p50): the report prints that floor beside the measured ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray.devtools.bench.harness import compute_ceiling, median_by_key, save_untrained
from segray.devtools.ports import free_port
from segray.errors import ConfigError
from segray.inference.run import BATCH_SIZE

APP_NAME = "segray-bench"
#: The default bench model's window: classic U-Net, binary, untrained, 3 bands.
DEFAULT_SIZE = 128
REQUEST_TIMEOUT_S = 60.0
CHILD_TIMEOUT_S = 1800.0
INGRESSES = ("proxy", "haproxy")


def bench_serve(
    model_uri: str | None = None,
    *,
    requests_per_level: int = 200,
    concurrencies: Sequence[int] = (1, 4, 16),
    max_batch_size: int = BATCH_SIZE,
    batch_wait_timeout_s: float | None = None,
    num_cpus: float = 1,
    ceiling_seconds: float = 5.0,
    ingresses: Sequence[str] = INGRESSES,
    rounds: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the bench, print a table and return the figures as a dict.

    ``model_uri`` defaults to an untrained binary ``unet`` at 128x128x3 built for the run. The
    tile posted is a synthetic one at the model's input size. ``batch_wait_timeout_s`` defaults to
    :class:`~segray.serve.config.ServeConfig`'s.
    """
    from segray.models import saving
    from segray.serve.config import ServeConfig
    from segray.serve.ingress import resolve

    wait = ServeConfig.model_fields["batch_wait_timeout_s"].default
    wait = wait if batch_wait_timeout_s is None else batch_wait_timeout_s
    settings = {
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": wait,
        "num_cpus": num_cpus,
        "concurrencies": list(concurrencies),
        "count": requests_per_level,
    }
    for name in ingresses:
        if name not in INGRESSES:
            raise ConfigError(f"--ingress: {name!r} is not one of {', '.join(INGRESSES)}")
    used = {name: resolve(name) for name in ingresses}  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        uri = model_uri or save_untrained(tmp, DEFAULT_SIZE)
        model, card = saving.load_model(uri)
        body = os.path.join(tmp, "tile.bin")
        with open(body, "wb") as f:
            f.write(_tile_png(card))
        runs: dict[str, list[dict]] = {name: [] for name in ingresses}
        ceilings = []
        for round_ in range(rounds):
            for name in ingresses:
                echo(f"round {round_ + 1}/{rounds}, ingress {used[name]}:")
                runs[name].append(_child(used[name], uri, body, settings, echo))
            ceilings.append(compute_ceiling(model, card, max_batch_size, ceiling_seconds))
    summary = _summarise(
        runs, ceilings, max_batch_size, concurrencies, uri if model_uri else None, used
    )
    echo(format_report(summary))
    return summary


def _child(
    ingress: str, uri: str, body: str, settings: dict[str, Any], echo: Callable[[str], None]
) -> dict[str, dict[int, dict[str, Any]]]:
    """One round of one ingress: a child process with its own Ray, in that ingress's
    environment (HAProxy's ports and files its own); returns its figures by batching label."""
    from segray.serve.ingress import environment, own_haproxy, short_folder

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= environment(ingress)  # type: ignore[arg-type]
    folder = short_folder()
    if ingress == "haproxy":
        env |= own_haproxy(folder, free_port(), free_port())
    args = [sys.executable, "-m", "segray.devtools.bench.serve", "--child", uri, body]
    args.append(json.dumps(settings))
    try:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"serve bench ({ingress}) failed: {done.stderr.strip()[-3000:]}")
    for line in lines[:-1]:
        echo(line)
    figures = json.loads(lines[-1])
    return {label: {int(c): f for c, f in levels.items()} for label, levels in figures.items()}


def _child_main(uri: str, body: str, settings: dict[str, Any]) -> None:
    """In the child: start Ray and Serve, measure both batching settings, print JSON last."""
    import ray
    from ray import serve

    from segray.runtime import init_ray

    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        sizes = (("batching", settings["max_batch_size"]), ("no_batching", 1))
        runs = {label: _bench_app(uri, size, settings, port, body) for label, size in sizes}
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(runs), flush=True)


def _tile_png(card: Any) -> bytes:
    from segray.devtools import synth
    from segray.io import imagery

    height, width, channels = card.input_shape
    if channels in synth.BANDS:
        image, _ = synth.generate_tile((height, width), 0, "binary", channels)
        return imagery.encode_png(image)
    image = np.random.default_rng(0).integers(0, 256, (height, width, channels), np.uint8)
    return imagery.encode_geotiff(image)


def _bench_app(
    uri: str, max_batch_size: int, settings: dict[str, Any], port: int, body: str
) -> dict[int, dict[str, Any]]:
    """Deploy the app with ``max_batch_size`` and measure each concurrency level."""
    from ray import serve

    from segray.serve.app import build_app
    from segray.serve.config import ServeConfig

    config = ServeConfig(
        model_uri=uri,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=settings["batch_wait_timeout_s"],
        num_cpus=settings["num_cpus"],
    )
    app = build_app(config)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for clients in settings["concurrencies"]:
            run_load(url, body, clients, 2 * clients)  # warm up
            before = _batch_sizes(url)
            result = run_load(url, body, clients, settings["count"])
            result["batches"] = _diff(_batch_sizes(url), before)
            results[clients] = _level_figures(result)
            rps = results[clients]["rps"]
            print(f"  max_batch_size={max_batch_size} clients={clients}: {rps:.1f} req/s")
    finally:
        serve.delete(APP_NAME)
    return results


def run_load(url: str, body_path: str, clients: int, count: int) -> dict[str, Any]:
    """:func:`load` in a separate Python process, so the client does not share the server's CPU
    time slices or GIL; returns its figures."""
    args = [
        sys.executable,
        "-m",
        "segray.devtools.bench.serve",
        url,
        body_path,
        str(clients),
        str(count),
    ]
    timeout = REQUEST_TIMEOUT_S * (count // max(clients, 1) + 2)
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load(url: str, body: bytes, clients: int, count: int) -> dict[str, Any]:
    """Post ``count`` tiles to ``url`` from ``clients`` threads; latencies (s), statuses, wall."""
    import requests

    local = threading.local()

    def one(_: int) -> tuple[float, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        try:
            status = local.session.post(
                f"{url}/v1/segment", data=body, timeout=REQUEST_TIMEOUT_S
            ).status_code
        except requests.RequestException:
            status = 0
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as threads:
        done = list(threads.map(one, range(count)))
    wall = time.perf_counter() - start
    return {"latencies": [d[0] for d in done], "statuses": [d[1] for d in done], "wall": wall}


def _batch_sizes(url: str) -> dict[str, int]:
    import requests

    return requests.get(f"{url}/v1/stats", timeout=REQUEST_TIMEOUT_S).json()["batch_sizes"]


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[int, int]:
    diff = {int(k): v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(diff.items()) if v}


def _level_figures(result: dict[str, Any]) -> dict[str, Any]:
    ms = np.asarray(result["latencies"]) * 1000
    ok = sum(s == 200 for s in result["statuses"])
    batches = result["batches"]
    mean_batch = sum(k * v for k, v in batches.items()) / max(sum(batches.values()), 1)
    return {
        "rps": ok / result["wall"],
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(ms),
        "errors": len(ms) - ok,
        "mean_batch": mean_batch,
        "batch_sizes": batches,
    }


def _median_levels(rounds: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Per concurrency level, the median of each figure over the rounds."""
    keys = ("rps", "p50_ms", "p95_ms", "p99_ms", "mean_batch")
    return {
        clients: {
            **median_by_key([r[clients] for r in rounds], keys),
            "requests": sum(r[clients]["requests"] for r in rounds),
            "errors": sum(r[clients]["errors"] for r in rounds),
        }
        for clients in rounds[0]
    }


def _summarise(
    runs: dict[str, list[dict[str, dict[int, dict[str, Any]]]]],
    ceilings: list[float],
    batch_size: int,
    concurrencies: Sequence[int],
    model_uri: str | None,
    used: dict[str, str],
) -> dict[str, Any]:
    top, low = max(concurrencies), min(concurrencies)
    ceiling = float(np.median(ceilings))
    ingresses = {}
    for name, rounds in runs.items():
        levels = {label: _median_levels([r[label] for r in rounds]) for label in rounds[0]}
        on = levels["batching"]
        saturated = [max(level["rps"] for level in r["batching"].values()) for r in rounds]
        ingresses[name] = {
            "ingress": used[name],
            "runs": levels,
            "saturated_rps": float(np.median(saturated)),
            "ratio_to_ceiling": float(
                np.median([v / c for v, c in zip(saturated, ceilings, strict=True)])
            ),
            "p99_top_over_p50_single": on[top]["p99_ms"] / on[low]["p50_ms"],
            "p99_over_p50_top": on[top]["p99_ms"] / on[top]["p50_ms"],
            # Little's law: mean latency at `top` clients >= top / ceiling
            "littles_floor": top / ceiling * 1000 / on[low]["p50_ms"],
        }
    summary: dict[str, Any] = {
        "model": model_uri or "unet 128x128x3 binary (untrained)",
        "ceiling_images_per_s": ceiling,
        "ceilings": ceilings,
        "ceiling_batch_size": batch_size,
        "ingresses": ingresses,
        "concurrency_top": top,
        "rounds": len(ceilings),
    }
    if {"proxy", "haproxy"} <= set(runs):
        pairs = zip(runs["haproxy"], runs["proxy"], strict=True)
        summary["haproxy_over_proxy"] = float(
            np.median([_saturated(h) / _saturated(p) for h, p in pairs])
        )
    return summary


def _saturated(run: dict[str, dict[int, dict[str, Any]]]) -> float:
    return max(level["rps"] for level in run["batching"].values())


def format_report(summary: dict[str, Any]) -> str:
    """The bench figures as a text table."""
    rounds = summary["rounds"]
    lines = [
        f"model: {summary['model']}; medians of {rounds} round(s)",
        f"{'ingress':<9}{'batching':<12}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'batch':>8}{'errors':>8}",
    ]
    for figures in summary["ingresses"].values():
        for label, levels in figures["runs"].items():
            for clients, f in levels.items():
                lines.append(
                    f"{figures['ingress']:<9}{label:<12}{clients:>8}{f['rps']:>9.1f}"
                    f"{f['p50_ms']:>9.1f}{f['p95_ms']:>9.1f}{f['p99_ms']:>9.1f}"
                    f"{f['mean_batch']:>8.1f}{f['errors']:>8}"
                )
    top = summary["concurrency_top"]
    lines.append(
        f"compute ceiling: {summary['ceiling_images_per_s']:.1f} images/s "
        f"(in-memory batches of {summary['ceiling_batch_size']})"
    )
    for f in summary["ingresses"].values():
        lines.append(
            f"{f['ingress']}: saturated {f['saturated_rps']:.1f} req/s = "
            f"{f['ratio_to_ceiling']:.2f} x ceiling; p99 at {top} clients / p50 at 1 client: "
            f"{f['p99_top_over_p50_single']:.2f} (Little's law floor at the ceiling: "
            f"{f['littles_floor']:.2f}); p99 / p50 at {top} clients: {f['p99_over_p50_top']:.2f}"
        )
    if "haproxy_over_proxy" in summary:
        lines.append(f"haproxy / proxy throughput: {summary['haproxy_over_proxy']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        _child_main(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        _url, _path, _clients, _count = sys.argv[1:5]
        with open(_path, "rb") as _f:
            _figures = load(_url, _f.read(), int(_clients), int(_count))
        print(json.dumps(_figures))
