"""``segray bench serve``: HTTP throughput and latency of the Serve endpoint, against the model.

A load generator in a separate process posts one tile per request from 1, 4 and 16 threads, with
batching on (``max_batch_size`` N) and off (1). The model's compute ceiling is measured in the same
run: the same model on in-memory batches of N through ``inference.infer``. All traffic goes to
127.0.0.1, with bounded request counts and timeouts. Serve must not already be running in the Ray
instance: the bench starts it on a free port and shuts it down at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray.inference.run import BATCH_SIZE

APP_NAME = "segray-bench"
#: The default bench model: classic U-Net, binary, untrained.
DEFAULT_MODEL = {"name": "unet", "num_classes": 2, "input_shape": (128, 128, 3)}
REQUEST_TIMEOUT_S = 60.0


def bench_serve(
    model_uri: str | None = None,
    *,
    requests_per_level: int = 200,
    concurrencies: Sequence[int] = (1, 4, 16),
    max_batch_size: int = BATCH_SIZE,
    batch_wait_timeout_s: float = 0.005,
    num_cpus: float = 1,
    ceiling_seconds: float = 5.0,
    port: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the bench, print a table and return the figures as a dict.

    ``model_uri`` defaults to an untrained binary ``unet`` at 128x128x3 built for the run. The
    tile posted is a synthetic one at the model's input size.
    """
    from ray import serve

    from segray.models import saving
    from segray.runtime import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        uri = model_uri or _default_model(tmp)
        model, card = saving.load_model(uri)
        body = os.path.join(tmp, "tile.bin")
        with open(body, "wb") as f:
            f.write(_tile_png(card))
        port = port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            runs = {
                label: _bench_app(
                    uri,
                    size,
                    batch_wait_timeout_s,
                    num_cpus,
                    port,
                    body,
                    concurrencies,
                    requests_per_level,
                    echo,
                )
                for label, size in (("batching", max_batch_size), ("no_batching", 1))
            }
        finally:
            serve.shutdown()
        ceiling = compute_ceiling(model, card, max_batch_size, ceiling_seconds)
    summary = _summarise(runs, ceiling, max_batch_size, concurrencies, uri if model_uri else None)
    echo(format_report(summary))
    return summary


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compute_ceiling(model: Any, card: Any, batch_size: int, seconds: float = 5.0) -> float:
    """Images/s of ``inference.infer`` on in-memory batches of ``batch_size`` (after warm-up)."""
    from segray import inference

    batch = np.random.default_rng(0).random((batch_size, *card.input_shape), np.float32)
    for _ in range(2):
        inference.infer(model, batch, card)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        inference.infer(model, batch, card)
        runs += 1
    return runs * batch_size / (time.perf_counter() - start)


def _default_model(folder: str) -> str:
    from segray.models import build_model, saving

    spec = DEFAULT_MODEL
    model = build_model(spec["name"], spec["num_classes"], spec["input_shape"])
    card = saving.ModelCard(**spec)
    saving.save_model(model, card, folder)
    return folder


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
    uri: str,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    num_cpus: float,
    port: int,
    body: str,
    concurrencies: Sequence[int],
    count: int,
    echo: Callable[[str], None],
) -> dict[int, dict[str, Any]]:
    """Deploy the app with ``max_batch_size`` and measure each concurrency level."""
    from ray import serve

    from segray.serve.app import build_app
    from segray.serve.config import ServeConfig

    app = build_app(
        ServeConfig(
            model_uri=uri,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            num_cpus=num_cpus,
            max_ongoing_requests=max(64, 4 * max_batch_size),
        )
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for clients in concurrencies:
            run_load(url, body, clients, 2 * clients)  # warm up
            before = _batch_sizes(url)
            result = run_load(url, body, clients, count)
            result["batches"] = _diff(_batch_sizes(url), before)
            results[clients] = _level_figures(result)
            echo(
                f"  max_batch_size={max_batch_size} clients={clients}: "
                f"{results[clients]['rps']:.1f} req/s"
            )
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


def _summarise(
    runs: dict[str, dict[int, dict[str, Any]]],
    ceiling: float,
    batch_size: int,
    concurrencies: Sequence[int],
    model_uri: str | None,
) -> dict[str, Any]:
    top, low = max(concurrencies), min(concurrencies)
    on = runs["batching"]
    saturated = max(level["rps"] for level in on.values())
    return {
        "model": model_uri or "unet 128x128x3 binary (untrained)",
        "ceiling_images_per_s": ceiling,
        "ceiling_batch_size": batch_size,
        "runs": runs,
        "saturated_rps": saturated,
        "ratio_to_ceiling": saturated / ceiling,
        "p99_top_over_p50_single": on[top]["p99_ms"] / on[low]["p50_ms"],
        "concurrency_top": top,
    }


def format_report(summary: dict[str, Any]) -> str:
    """The bench figures as a text table."""
    lines = [
        f"model: {summary['model']}",
        f"{'batching':<12}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'batch':>8}{'errors':>8}",
    ]
    for label, levels in summary["runs"].items():
        for clients, f in levels.items():
            lines.append(
                f"{label:<12}{clients:>8}{f['rps']:>9.1f}{f['p50_ms']:>9.1f}{f['p95_ms']:>9.1f}"
                f"{f['p99_ms']:>9.1f}{f['mean_batch']:>8.1f}{f['errors']:>8}"
            )
    lines += [
        f"compute ceiling: {summary['ceiling_images_per_s']:.1f} images/s "
        f"(in-memory batches of {summary['ceiling_batch_size']})",
        f"saturated throughput: {summary['saturated_rps']:.1f} req/s = "
        f"{summary['ratio_to_ceiling']:.2f} x ceiling",
        f"p99 at {summary['concurrency_top']} clients / p50 at 1 client: "
        f"{summary['p99_top_over_p50_single']:.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    _url, _path, _clients, _count = sys.argv[1:5]
    with open(_path, "rb") as _f:
        _figures = load(_url, _f.read(), int(_clients), int(_count))
    print(json.dumps(_figures))
