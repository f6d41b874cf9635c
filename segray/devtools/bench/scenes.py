"""``segray bench scenes``: scenes stitched in parallel against one at a time, in one run.

On the same model and the same synthetic scene (copied ``scenes`` times under new names):

- **all at once** — one bulk job over the ``scenes`` scenes (scene tasks stitch several at once);
- **one at a time** — a job over one scene, times ``scenes`` (what a loop of jobs would take);
- **model alone** — windows/s of :func:`segray.inference.infer` on in-memory batches of windows.

Peak RSS is sampled from ``/proc`` during the all-at-once job: the driver and every Ray worker
process by title (``ray::stitch_scene`` while a scene task runs, ``ray::Predictor`` the
actors), beside the sizes that matter: a band of the stitcher (``(window + stride) x width x
classes x 4`` bytes) and the scene whole (its pixels, and its float logits).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from segray.devtools.bench.harness import RssSampler, anchor_pool, model_rate, save_untrained

#: Classes of the bench model: the classic U-Net (1.94 M parameters), binary, untrained.
CLASSES = 2


def bench_scenes(
    size: int = 4096,
    scenes: int = 8,
    window: int = 512,
    overlap: int = 64,
    *,
    repeats: int = 1,
    job: dict[str, Any] | None = None,
    model_seconds: float = 5.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the bench; prints and returns its figures. ``job`` holds extra
    :class:`~segray.bulk.PredictConfig` fields of every job run."""
    from segray.inference.tiling import scene_windows
    from segray.runtime import init_ray

    extra = {"window": window, "overlap": overlap, **(job or {})}
    n_windows = len(scene_windows(size, size, window, overlap))
    with tempfile.TemporaryDirectory() as tmp, anchor_pool() as pool:
        model = os.path.join(tmp, "model")
        pool.submit(save_untrained, model, window, CLASSES).result()
        one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        pool.submit(write_scenes, many, size, scenes).result()  # the driver's RSS its own
        os.makedirs(one)
        shutil.copy(os.path.join(many, "scene_000.tif"), one)
        rate = pool.submit(model_rate, model, model_seconds).result()
        init_ray()
        singles, alls, samplers = [], [], []
        for r in range(repeats):
            singles.append(_job(model, one, os.path.join(tmp, f"out-one-{r}"), extra)[0])
            seconds, sampler = _job(model, many, os.path.join(tmp, f"out-many-{r}"), extra)
            alls.append(seconds)
            samplers.append(sampler)
    single, together = statistics.median(singles), statistics.median(alls)
    sampler = samplers[len(samplers) // 2]
    classes = CLASSES
    stride = window - overlap
    figures = {
        "size": size,
        "scenes": scenes,
        "window": window,
        "windows_per_scene": n_windows,
        "one_s": single,
        "one_runs": [round(v, 1) for v in singles],
        "all_s": together,
        "all_runs": [round(v, 1) for v in alls],
        "speedup": scenes * single / together,
        "windows_per_s": scenes * n_windows / together,
        "model_windows_per_s": rate,
        "driver_mib": sampler.driver / 2**20,
        "processes_mib": {k: v / 2**20 for k, v in sorted(sampler.by_title.items())},
        "band_mib": (window + stride) * size * classes * 4 / 2**20,
        "scene_mib": size * size * 3 / 2**20,
        "logits_mib": size * size * classes * 4 / 2**20,
    }
    echo(format_report(figures))
    return figures


def _job(model: str, scenes: str, out: str, extra: dict[str, Any]) -> tuple[float, RssSampler]:
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict

    config = PredictConfig(model=model, input=scenes, output=out, scene=True, **extra)
    with RssSampler() as sampler:
        start = time.perf_counter()
        result = predict(config)
        seconds = time.perf_counter() - start
    if not result.ok or result.counts.get("ok", 0) != result.total:
        raise RuntimeError(f"bench job failed: {result.summary()}")
    return seconds, sampler


def write_scenes(out: str, size: int, count: int) -> None:
    """``count`` copies of one synthetic 8-bit RGB scene of ``size`` px, GeoTIFF (deflate, 256
    px tiles), as ``scene_000.tif`` …"""
    from segray.devtools import synth
    from segray.io import imagery

    os.makedirs(out, exist_ok=True)
    image, _ = synth.generate_tile(size, synth.tile_seed(0, 0))
    data = imagery.encode_geotiff(image, synth.CRS, synth.grid_transform(0, 0, size))
    del image
    for i in range(count):
        with open(os.path.join(out, f"scene_{i:03d}.tif"), "wb") as f:
            f.write(data)


def format_report(f: dict[str, Any]) -> str:
    lines = [
        f"{f['scenes']} scenes of {f['size']}² px, {f['windows_per_scene']} windows of "
        f"{f['window']} px each:",
        f"  all at once  {f['all_s']:.1f} s {f['all_runs']}  ({f['windows_per_s']:.2f} windows/s)",
        f"  one at a time {f['scenes']} x {f['one_s']:.1f} s {f['one_runs']} = "
        f"{f['scenes'] * f['one_s']:.1f} s",
        f"  speed-up {f['speedup']:.2f}x; job / model alone "
        f"{f['windows_per_s'] / f['model_windows_per_s']:.2f}x "
        f"(model {f['model_windows_per_s']:.2f} windows/s)",
        f"  peak RSS: driver {f['driver_mib']:.0f} MiB; "
        + "; ".join(f"{k} {v:.0f} MiB" for k, v in f["processes_mib"].items()),
        f"  for scale: a stitcher band {f['band_mib']:.0f} MiB, the scene's pixels "
        f"{f['scene_mib']:.0f} MiB, its logits {f['logits_mib']:.0f} MiB",
    ]
    return "\n".join(lines)
