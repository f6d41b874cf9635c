"""``segray bench predict``: a bulk job against a plain loop and the model alone, in one run.

On the same GeoTIFF tiles and the same model:

- **job** — :func:`segray.bulk.predict`, timed from the call to its result (actor start and model
  load included), Ray already running as on any cluster;
- **loop** — one process, one tile at a time: read, decode, prepare, the same compiled model call
  (:func:`segray.inference.infer`, batch of one), render, encode, write; run in a fresh process,
  as a user runs a script, so that like the job it pays for importing Keras and loading the model:
  its rate over the job's tile count is that start plus the tiles at the rate it then keeps;
- **model** — :func:`segray.inference.infer` on in-memory batches of ``batch_size`` windows.

The loop and the model run in a child process, so the job's driver never imports Keras and its
resident memory is its own. Peak RSS is sampled from ``/proc`` while the job runs: the driver, and
every Ray worker process (the Predictor actors and the read/write tasks). The figures that matter
are the ratios, taken side by side on one machine; each rate is the median of ``repeats`` runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segray.devtools.bench.harness import (
    RssSampler,
    anchor_pool,
    median_by_key,
    model_rate,
    save_untrained,
)

#: Distinct synthetic tiles the collection cycles through (each file has its own georeference).
POOL = 64


def bench_predict(
    sizes: Sequence[tuple[int, int]] = ((64, 4000), (256, 300)),
    *,
    s3: bool = True,
    rss_tiles: Sequence[int] = (1000, 10_000),
    repeats: int = 3,
    loop_tiles: int = 600,
    model_seconds: float = 5.0,
    job: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the bench over ``sizes`` ((tile px, tile count) pairs), print the table, return figures.

    ``job`` holds extra :class:`~segray.bulk.PredictConfig` fields for every job run (for example
    ``{"concurrency": 2}``). ``rss_tiles`` are the tile counts (of the first size, local) at which
    the job's driver and worker peak RSS are compared; empty skips that part.
    """
    from segray.devtools.s3server import TEST_CREDENTIALS, MotoServer
    from segray.runtime import init_ray

    rows, rss = [], []
    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    with tempfile.TemporaryDirectory() as tmp, anchor_pool() as pool:
        server = MotoServer().start() if s3 else None
        try:
            if server is not None:  # before Ray starts: its workers inherit the environment
                os.environ.update(TEST_CREDENTIALS)
            init_ray()
            for size, count in sizes:
                model = os.path.join(tmp, f"model-{size}")
                pool.submit(save_untrained, model, size).result()
                local = os.path.join(tmp, f"tiles-{size}")
                write_tiles(local, count, size)
                targets = [("local", local, None)]
                if server is not None:
                    bucket = f"s3://bench-{size}/tiles"
                    write_tiles(bucket, count, size, endpoint=server.endpoint)
                    targets.append(("s3", bucket, server.endpoint))
                rate = pool.submit(model_rate, model, model_seconds).result()
                for where, tiles, endpoint in targets:
                    out = tmp if endpoint is None else f"s3://bench-{size}"
                    loop_out = f"{out}/loop-{size}-{where}"
                    runs, loops = [], []
                    for r in range(repeats):  # side by side: a loop right after each job
                        masks = f"{out}/masks-{size}-{where}-{r}"
                        runs.append(_job(model, tiles, masks, endpoint, job or {}))
                        with anchor_pool() as fresh:  # a new process: the loop's own start
                            args = (model, tiles, f"{loop_out}-{r}", endpoint, loop_tiles)
                            loops.append(fresh.submit(_loop_rate, *args).result())
                        same_masks(f"{loop_out}-{r}", masks, endpoint)
                    looped = median_by_key(loops, ("steady_per_s", "start_s"))
                    loop_steady, loop_start = looped["steady_per_s"], looped["start_s"]
                    loop = count / (loop_start + count / loop_steady)
                    ran = median_by_key(runs, ("tiles_per_s", "steady_per_s", "start_s"))
                    job_rate, steady = ran["tiles_per_s"], ran["steady_per_s"]
                    rows.append(
                        {
                            "size": size,
                            "tiles": count,
                            "storage": where,
                            "job": job_rate,
                            "steady": steady,
                            "start_s": ran["start_s"],
                            "job_runs": [round(r["tiles_per_s"], 1) for r in runs],
                            "loop_runs": [round(one["steady_per_s"], 1) for one in loops],
                            "loop": loop,
                            "loop_steady": loop_steady,
                            "loop_start_s": loop_start,
                            "model": rate,
                            "job_vs_loop": job_rate / loop,
                            "steady_vs_loop": steady / loop_steady,
                            "job_vs_model": job_rate / rate,
                            "steady_vs_model": steady / rate,
                        }
                    )
                    echo(format_row(rows[-1]))
            if rss_tiles:
                size = sizes[0][0]
                model = os.path.join(tmp, f"model-{size}")
                for count in rss_tiles:
                    tiles = os.path.join(tmp, f"rss-{count}")
                    write_tiles(tiles, count, size)
                    run = _job(model, tiles, os.path.join(tmp, f"rss-out-{count}"), None, job or {})
                    rss.append({"tiles": count, "size": size, **run})
                    echo(format_rss(rss[-1]))
        finally:
            if server is not None:
                server.stop()
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    summary = {"rates": rows, "rss": rss, "repeats": repeats}
    echo(format_report(summary))
    return summary


# --- the three contenders ----------------------------------------------------------------------


def _job(model: str, tiles: str, out: str, endpoint: str | None, extra: dict) -> dict[str, Any]:
    """One bulk job, timed, with the peak RSS of the driver and of Ray's worker processes."""
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict

    config = PredictConfig(model=model, input=tiles, output=out, endpoint=endpoint, **extra)
    arrivals: list[tuple[float, int]] = []

    def on_rows(n: int) -> None:
        arrivals.append((time.perf_counter(), n))

    with RssSampler() as sampler:
        start = time.perf_counter()
        result = predict(config, on_rows)
        seconds = time.perf_counter() - start
    if not result.ok or result.counts.get("ok", 0) != result.total:
        raise RuntimeError(f"bench job failed: {result.summary()}")
    return {
        "tiles_per_s": result.total / seconds,
        "steady_per_s": steady_rate(arrivals),
        "start_s": arrivals[0][0] - start,
        "seconds": seconds,
        "driver_mib": sampler.driver / 2**20,
        "worker_mib": sampler.workers / 2**20,
        "actor_mib": sampler.actors / 2**20,
    }


def steady_rate(arrivals: list[tuple[float, int]], skip: float = 0.2, fewest: int = 20) -> float:
    """Rows/s once the pipeline is full: from the arrival that takes the count past ``skip`` of
    all rows to the last. (From the first arrival it would overstate: masks are written in
    blocks, so the first rows arrive after many tiles went through the model.) NaN for fewer
    than ``fewest`` arrivals, where blocks queued during start-up would inflate it too."""
    if len(arrivals) < fewest:
        return float("nan")
    total = sum(n for _, n in arrivals)
    seen = 0
    for i, (t, n) in enumerate(arrivals):
        seen += n
        if seen >= skip * total and i < len(arrivals) - 1:
            later = total - seen
            return later / (arrivals[-1][0] - t)
    return float("nan")


def _loop_rate(
    model_uri: str, tiles: str, out: str, endpoint: str | None, limit: int
) -> dict[str, float]:
    """The plain loop over the first ``limit`` + 1 tiles, in one GDAL environment as a careful
    user writes it (and as the job's tasks run a batch): ``start_s``, from entry (Keras not yet
    imported in a fresh process) to the first tile written, which compiles the model call; and
    ``steady_per_s``, the tiles/s of the others."""
    entry = time.perf_counter()
    from segray import inference
    from segray.bulk.sinks import encode_like
    from segray.io import gdal, imagery, storage

    source, sink = storage.filesystem(tiles, endpoint), storage.filesystem(out, endpoint)
    model, card = inference.load(model_uri, storage.filesystem(model_uri, endpoint))
    uris = source.list_files(tiles, suffixes=(".tif",))[: limit + 1]
    start = 0.0
    with gdal.env():
        for n, uri in enumerate(uris):
            if n == 1:
                start = time.perf_counter()
            tile = imagery.decode(source.read_bytes(uri), uri)
            x = inference.prepare(tile, card)
            logits = inference.mark_nodata(inference.infer(model, x[None], card)[0], tile.valid)
            masks, _ = inference.render_outputs(logits[None], card)
            name = storage.join(out, storage.relative_to(tiles, uri))
            sink.write_bytes(name, encode_like(masks[0], tile, name))
    return {
        "start_s": start - entry,
        "steady_per_s": (len(uris) - 1) / (time.perf_counter() - start),
    }


def same_masks(loop_out: str, job_out: str, endpoint: str | None) -> int:
    """Check that the loop wrote, for every tile it did, the very mask the job wrote (the anchor
    computes what the job computes); returns the number compared."""
    from segray.io import imagery, storage

    fs = storage.filesystem(loop_out, endpoint)
    names = fs.list_files(loop_out, suffixes=(".tif",))
    for uri in names:
        twin = storage.join(job_out, storage.relative_to(loop_out, uri))
        mine, theirs = (imagery.decode(fs.read_bytes(u), u).array for u in (uri, twin))
        if not np.array_equal(mine, theirs):
            raise RuntimeError(f"the plain loop's mask {uri} differs from the job's {twin}")
    if not names:
        raise RuntimeError(f"the plain loop wrote no mask under {loop_out}")
    return len(names)


# --- tiles -------------------------------------------------------------------------------------


def write_tiles(out: str, count: int, size: int, endpoint: str | None = None) -> None:
    """``count`` georeferenced 8-bit RGB GeoTIFF tiles of ``size`` px under ``out``, cycling
    through :data:`POOL` synthetic scenes, each file on its own cell of the collection grid."""
    from concurrent.futures import ThreadPoolExecutor

    from segray.devtools import synth
    from segray.io import imagery, storage

    fs = storage.filesystem(out, endpoint)
    fs.make_bucket(out)
    pool = [synth.generate_tile(size, synth.tile_seed(0, i))[0] for i in range(min(POOL, count))]
    columns = int(np.ceil(np.sqrt(count)))

    def one(index: int) -> None:
        row, col = divmod(index, columns)
        data = imagery.encode_geotiff(
            pool[index % len(pool)], synth.CRS, synth.grid_transform(row, col, size)
        )
        uri = storage.join(out, f"r{row:04d}/tile_r{row:04d}_c{col:04d}.tif")
        fs.write_bytes(uri, data)

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(one, range(count)))


# --- report ------------------------------------------------------------------------------------


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['size']:>4} px {row['storage']:<5} {row['tiles']:>6} tiles: job "
        f"{row['job']:6.1f}/s {row['job_runs']} (first masks after {row['start_s']:.1f} s; "
        f"at full flow {row['steady']:.1f}/s)  loop {row['loop']:.1f}/s (start "
        f"{row['loop_start_s']:.1f} s; then {row['loop_steady']:.1f}/s {row['loop_runs']})  "
        f"model {row['model']:.1f}/s  "
        f"job/loop {row['job_vs_loop']:.2f}x ({row['steady_vs_loop']:.2f}x)  job/model "
        f"{row['job_vs_model']:.2f}x ({row['steady_vs_model']:.2f}x)"
    )


def format_rss(run: dict[str, Any]) -> str:
    return (
        f"{run['tiles']:>6} tiles of {run['size']} px: {run['tiles_per_s']:.1f}/s, peak RSS "
        f"driver {run['driver_mib']:.0f} MiB, largest worker {run['worker_mib']:.0f} MiB "
        f"(Predictor {run['actor_mib']:.0f} MiB)"
    )


def format_report(summary: dict[str, Any]) -> str:
    """The README's table: rates, ratios, and the driver's memory growth."""
    lines = [
        "| tiles | storage | job tiles/s (full flow) | plain loop (full flow) | model alone "
        "| job / loop | job / model |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rates"]:
        lines.append(
            f"| {r['tiles']:,} × {r['size']} px | {r['storage']} | {r['job']:.1f} "
            f"({r['steady']:.1f}) | {r['loop']:.1f} ({r['loop_steady']:.1f}) | {r['model']:.1f} "
            f"| {r['job_vs_loop']:.2f}× "
            f"({r['steady_vs_loop']:.2f}×) | "
            f"{r['job_vs_model']:.2f}× ({r['steady_vs_model']:.2f}×) |"
        )
    local = {r["size"]: r for r in summary["rates"] if r["storage"] == "local"}
    for r in summary["rates"]:
        if r["storage"] == "s3" and r["size"] in local:
            here = local[r["size"]]
            whole, flow = r["job"] / here["job"], r["steady"] / here["steady"]
            lines.append(f"S3 → S3 / local at {r['size']} px: {whole:.2f}× ({flow:.2f}×)")
    rss = summary["rss"]
    if len(rss) >= 2:
        first, last = rss[0], rss[-1]
        growth = last["driver_mib"] / first["driver_mib"] - 1
        lines.append(
            f"driver peak RSS {first['driver_mib']:.0f} MiB at {first['tiles']:,} tiles → "
            f"{last['driver_mib']:.0f} MiB at {last['tiles']:,} ({growth:+.1%}); largest worker "
            f"{first['worker_mib']:.0f} → {last['worker_mib']:.0f} MiB"
        )
    lines.append(
        f"(median of {summary['repeats']} runs; the loop's rate over the job's tiles is its start "
        "in a fresh process (Keras import, model load, first tile) plus those tiles at the rate it "
        "then keeps; in brackets: at full flow, the job from the first 20% of masks to the last, "
        "the loop after its first tile)"
    )
    return "\n".join(lines)
