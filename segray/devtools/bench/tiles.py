"""``segray bench tiles``: map tiles of the model over a scene through Serve, against their parts.

Over the native tiles of a synthetic UTM scene, through real HTTP to a Serve app on 127.0.0.1:

- **cold**: each ``layer=mask`` tile asked once (the model runs), one client;
- **warm**: the same tiles again (the tile cache answers);
- **16 clients**: the tiles of a copy of the scene (a new source: cold), 16 threads at once.

Side by side, in this process: the same tiles read with their margin through segray's reader
and the model alone on their windows (``inference.infer``, the call Serve makes), a plain
rio-tiler read of each tile (TiTiler's path, without a model), and the model's ceiling on
in-memory batches. Ratios: cold p50 / (read + model) p50; 16-client tiles/s / the ceiling in
tiles/s (windows/s over windows per tile).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray.devtools.bench.harness import compute_ceiling, save_untrained

APP_NAME = "segray-bench-tiles"
TMS_NAME = "WebMercatorQuad"


def _model(folder: str, size: int) -> str:
    """The bench's small untrained U-Net (8 base filters, depth 3) of buildings."""
    return save_untrained(
        folder,
        size,
        class_names=["background", "building"],
        dtype="uint8",
        options={"base_filters": 8, "depth": 3},
    )


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _get_all(urls: list[str], clients: int) -> tuple[list[float], float, list[int]]:
    import requests

    local = threading.local()

    def one(url: str) -> tuple[float, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        status = local.session.get(url, timeout=120).status_code
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, urls))
    return [d[0] for d in done], time.perf_counter() - start, [d[1] for d in done]


def bench_tiles(
    scene_size: int = 1024, model_size: int = 128, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the bench, print its table, return the figures."""
    from ray import serve

    from segray.devtools import labelled_scenes
    from segray.devtools.ports import free_port
    from segray.runtime import init_ray
    from segray.serve import app as serve_app
    from segray.serve.config import ServeConfig

    init_ray()
    with tempfile.TemporaryDirectory(prefix="segray-bench-tiles-") as tmp:
        model_uri = _model(os.path.join(tmp, "model"), model_size)
        imagery = os.path.join(tmp, "imagery")
        labelled_scenes.write_labelled_scenes(imagery, count=1, scene_size=scene_size, seed=5)
        scene = os.path.join(imagery, "images", "scene_000.tif")
        copy = os.path.join(imagery, "images", "scene_copy.tif")
        shutil.copy(scene, copy)
        config = ServeConfig(
            model_uri=model_uri, allowed_sources=(imagery,), tile_cache_bytes=256 * 2**20
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serve_app.build_app(config), name=APP_NAME, route_prefix="/")
        try:
            base = f"http://127.0.0.1:{port}/v1/tiles/{TMS_NAME}"
            tiles = _native_tiles(scene)
            urls = [f"{base}/{t.z}/{t.x}/{t.y}.png?url={scene}&layer=mask" for t in tiles]
            _get_all(urls[:1], 1)  # the replica's first call compiles the model
            cold, _, statuses = _get_all(urls, 1)
            warm, _, statuses2 = _get_all(urls, 1)
            many = [u.replace(scene, copy) for u in urls]
            _, wall, statuses3 = _get_all(many, 16)
        finally:
            serve.delete(APP_NAME)
            serve.shutdown()
        bad = [s for s in statuses + statuses2 + statuses3 if s != 200]
        anchors = _anchors(model_uri, scene, tiles, config)
        from segray.models import saving

        model, card = saving.load_model(model_uri)
        ceiling = compute_ceiling(model, card, 16, 5.0)
    figures = {
        "tiles": len(tiles),
        "errors": len(bad),
        "cold": _percentiles(cold),
        "warm": _percentiles(warm),
        "tiles_per_s_16": len(many) / wall,
        **anchors,
        "ceiling_tiles_per_s": ceiling / anchors["windows_per_tile"],
    }
    _report(figures, echo)
    return figures


def _native_tiles(scene: str) -> list[Any]:
    import morecantile

    from segray.io.maptiles import MapTiles
    from segray.io.readers import open_reader

    with open_reader(scene) as reader:
        info = MapTiles(reader).info()
    tms = morecantile.tms.get(TMS_NAME)
    return list(tms.tiles(*info.bounds, zooms=[info.maxzoom]))


def _anchors(model_uri: str, scene: str, tiles: list[Any], config: Any) -> dict[str, Any]:
    """Per tile: the margin read, the model on its windows, a plain rio-tiler read."""
    from rio_tiler.io import Reader

    from segray.inference.segmenter import Segmenter
    from segray.io.maptiles import MapTiles
    from segray.io.readers import open_reader
    from segray.models import saving
    from segray.serve.maps import TILE_SIZE, MapService

    model, card = saving.load_model(model_uri)
    segmenter = Segmenter(model, card, overlap=config.overlap, blend=config.blend)
    margin = MapService(config, segmenter, None).margin  # type: ignore[arg-type]
    reads, runs, plain, windows = [], [], [], []
    with open_reader(scene) as reader:
        maps = MapTiles(reader)
        for warmup in (True, False):
            for t in tiles:
                start = time.perf_counter()
                tile = maps.read(t.z, t.x, t.y, size=TILE_SIZE, margin=margin, bands=card.bands)
                batch = segmenter.prepare(tile).stack
                read = time.perf_counter() - start
                start = time.perf_counter()
                segmenter.run([batch])
                run = time.perf_counter() - start
                if not warmup:
                    reads.append(read), runs.append(run), windows.append(len(batch))
    with Reader(scene) as cog:
        for t in tiles:
            start = time.perf_counter()
            cog.tile(t.x, t.y, t.z, tilesize=TILE_SIZE)
            plain.append(time.perf_counter() - start)
    both = [a + b for a, b in zip(reads, runs, strict=True)]
    return {
        "read": _percentiles(reads),
        "model": _percentiles(runs),
        "read_model": _percentiles(both),
        "rio_tiler": _percentiles(plain),
        "windows_per_tile": float(np.mean(windows)),
    }


def _report(f: dict[str, Any], echo: Callable[[str], None]) -> None:
    ms = lambda pair: f"{pair[0] * 1000:8.1f} {pair[1] * 1000:8.1f}"  # noqa: E731
    echo(f"{f['tiles']} native tiles of 256 px, {f['windows_per_tile']:.1f} windows each")
    echo("                                    p50 ms   p95 ms")
    echo(f"cold tile (Serve, model runs)     {ms(f['cold'])}")
    echo(f"warm tile (Serve, cache)          {ms(f['warm'])}")
    echo(f"read with margin (in process)     {ms(f['read'])}")
    echo(f"model on its windows (in process) {ms(f['model'])}")
    echo(f"read + model                      {ms(f['read_model'])}")
    echo(f"rio-tiler plain read, no model    {ms(f['rio_tiler'])}")
    echo(
        f"cold / (read + model), p50: {f['cold'][0] / f['read_model'][0]:.2f}x   "
        f"p95: {f['cold'][1] / f['read_model'][1]:.2f}x"
    )
    ratio = f["tiles_per_s_16"] / f["ceiling_tiles_per_s"]
    echo(
        f"16 clients: {f['tiles_per_s_16']:.2f} tiles/s; model ceiling "
        f"{f['ceiling_tiles_per_s']:.2f} tiles/s: {ratio:.2f}x"
    )
    echo(f"non-200 answers: {f['errors']}")
