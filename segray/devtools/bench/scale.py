"""Scale: the planning step at a million keys.

:func:`bench_plan` plans a job over a simulated listing in a fresh process, so that its peak RSS
is the planner's alone.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from segray.devtools.bench.harness import anchor_pool, rss_bytes


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
