"""``segray bench chips``: training from large scenes streams chips, whatever the scenes' size.

For each scene count (default 1 and 4 scenes of 4,096² px, 4 bands of uint16: 128 MiB of pixels a
scene), a fresh child process writes the scenes with their buildings as one WGS84 GeoJSON, starts
Ray with a small object store (default 96 MiB, below the pixels of one scene) and trains one epoch
from chips. While it trains it samples, every 0.2 s:

- the object store's bytes in use (the raylet's own figure, ``memory_summary``);
- the peak RSS of the driver and of every Ray worker process by title (the training workers, the
  Ray Data tasks reading chips).

The figures to read: the store's peak against the chips in flight (what each worker's stream may
hold: :func:`segray.train.feed.stream_budget`), the chips streamed in the epoch and the pixels of
the scenes; and peak RSS with 4 scenes against 1 (flat: a chip costs the same whatever the scene
count).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

from segray.devtools.bench.harness import RssSampler, Sampler, anchor_pool

MiB = 2**20


def bench_chips(
    counts: tuple[int, ...] = (1, 4),
    scene_size: int = 4096,
    *,
    bands: int = 4,
    size: int = 128,
    chips: int = 256,
    store_mib: int = 96,
    model_options: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the bench (one child process per scene count); prints and returns its figures.
    ``model_options`` size the U-Net (default base_filters 8, depth 3): the store's figures do
    not depend on it, the seconds do."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            root = os.path.join(tmp, f"s{count}")
            with anchor_pool() as pool:  # the scenes are drawn in a process of their own
                pool.submit(_write, root, count, scene_size, bands).result()
            with anchor_pool() as pool:
                options = model_options or {"base_filters": 8, "depth": 3}
                args = (root, count, scene_size, bands, size, chips, store_mib, options)
                job = pool.submit(_train_probe, *args)
                rows.append(job.result())
            echo(format_row(rows[-1]))
    return rows


def _write(root: str, count: int, scene_size: int, bands: int) -> None:
    from segray.devtools.labelled_scenes import write_labelled_scenes

    data = os.path.join(root, "data")
    write_labelled_scenes(data, count=count, scene_size=scene_size, bands=bands, dtype="uint16")


def _train_probe(
    root: str,
    count: int,
    scene_size: int,
    bands: int,
    size: int,
    chips: int,
    store_mib: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    from segray.runtime import init_ray
    from segray.train.augment import AugmentConfig
    from segray.train.config import TrainConfig
    from segray.train.driver import train

    data = os.path.join(root, "data")
    init_ray(object_store_memory=store_mib * MiB)
    config = TrainConfig(
        data=data,
        out=os.path.join(root, "run"),
        layout="scenes",
        labels=os.path.join(data, "labels.geojson"),
        model_options=options,
        size=size,
        epochs=1,
        chips_per_epoch=chips,
        batch_size=8,
        workers=2,
        max_failures=0,
        augment=AugmentConfig.off(),
    )
    store = StorePeak()
    start = time.monotonic()
    with RssSampler() as sampler, store:
        train(config)
    seconds = time.monotonic() - start
    workers = {k: v for k, v in sampler.by_title.items() if k.startswith("ray::")}
    from segray.train.feed import stream_budget

    row = size * size * (bands * 2 + 2)
    return {
        "streamed_mib": chips * row / MiB,
        "in_flight_mib": config.workers * stream_budget(config.per_worker_batch(), row) / MiB,
        "scenes": count,
        "scene_size": scene_size,
        "pixels_mib": count * scene_size**2 * bands * 2 / MiB,
        "chip_mib": size * size * bands * 2 / MiB,
        "store_peak_mib": store.peak / MiB,
        "store_mib": store_mib,
        "driver_mib": sampler.driver / MiB,
        "largest_worker_mib": sampler.workers / MiB,
        "by_title_mib": {k: round(v / MiB) for k, v in sorted(workers.items())},
        "seconds": seconds,
    }


class StorePeak(Sampler):
    """The object store's peak bytes in use, sampled from the raylet while in the block."""

    final = False

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, store_bytes())


def store_bytes() -> int:
    """Bytes the object store holds now (plasma, spilled objects not counted)."""
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(found.group(1)) * MiB if found else 0


def format_row(f: dict[str, Any]) -> str:
    """One line of figures per scene count."""
    titles = ", ".join(f"{k} {v}" for k, v in f["by_title_mib"].items())
    return (
        f"{f['scenes']} scene(s) of {f['scene_size']}² ({f['pixels_mib']:,.0f} MiB of pixels): "
        f"{f['streamed_mib']:,.0f} MiB of chips streamed; object store peak "
        f"{f['store_peak_mib']:.0f} MiB of {f['store_mib']} (chips in flight allowed: "
        f"{f['in_flight_mib']:.0f} MiB); driver {f['driver_mib']:.0f} MiB, largest worker "
        f"{f['largest_worker_mib']:.0f} MiB [{titles}]; {f['seconds']:.0f} s"
    )
