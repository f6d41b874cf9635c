"""Map tiles of a model over any allowed GeoTIFF/COG: the layers, their pyramid and their colours.

The model runs on the source's **native tiles** only (the zoom whose resolution is the source's,
:class:`~segray.io.maptiles.MapInfo` ``maxzoom``), each read with ``margin`` pixels around it and
cropped back, so tiles join without seams. A tile of another zoom is made from native ones: a
closer tile is a part of its native ancestor, scaled up; a tile up to :data:`MAX_ZOOM_OUT` zooms
out is the mosaic of its native descendants, scaled down. So the mask is one mask at every zoom,
and no zoom shows the model pixels at a scale it never saw. Native predictions (class ids and
class probabilities, bytes) and rendered PNGs share one :class:`~segray.serve.tilecache.TileCache`.

Layers: ``mask`` (the card's palette; background and no data transparent), ``probability`` (a
ramp of one class's probability), ``image`` (the card's bands as RGB, stretched between the
source's 2nd and 98th percentiles), ``precomputed`` (a bulk job's mask COG in the palette,
no model). Each source's reads run in one thread of its own, with one GDAL environment.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine

from segray import inference
from segray.errors import ConfigError, SegrayError, TileError
from segray.inference import tiling
from segray.inference.segmenter import Segmenter, Windows
from segray.io import gdal, storage
from segray.io.maptiles import TILE_SIZE, MapTiles
from segray.io.readers import Grid, open_reader
from segray.serve.http import ApiError, tile_error
from segray.serve.sources import DRIVERS, check_source, normalise_prefixes
from segray.serve.tilecache import TileCache

LAYERS = ("mask", "probability", "image", "precomputed")
#: Model layers go at most this many zooms out from the native one (16 native tiles a tile).
MAX_ZOOM_OUT = 2
#: Tiles closer than this many zooms in are scaled from a native tile no more.
MAX_ZOOM_IN = 8
#: Open sources a replica keeps (each with its reader and thread).
OPEN_SOURCES = 16
#: Side of the coarse read that gives a source's percentile stretch.
STRETCH_SIDE = 512
#: Anchors of the probability ramp, 0 to 1 (the viridis colour map's ends and quartiles).
RAMP = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32
)


@dataclass(frozen=True)
class Prediction:
    """The model on one native tile: class ids (``NODATA`` where no data) and the probability
    (0..254) of every class, (H, W, K)."""

    classes: np.ndarray
    probabilities: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.classes.nbytes + self.probabilities.nbytes


class MapSource:
    """One allowed raster: its reader, its tiles on a tile matrix set, and the one thread that
    opens, reads and closes it (GDAL datasets are not shared between threads)."""

    def __init__(self, uri: str, fs: Any, tms: str, identity: tuple) -> None:
        self.uri, self.tms, self.identity = uri, tms, identity
        self.key = hashlib.sha1(repr((uri, tms, identity)).encode()).hexdigest()[:16]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="segray-map", initializer=_enter_gdal
        )
        self.reader = open_reader(uri, fs, drivers=DRIVERS)
        self.tiles = MapTiles(self.reader, tms)
        self._stretch: np.ndarray | None = None

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` in this source's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def stretch(self, bands: tuple[int, ...]) -> np.ndarray:
        """(2, C) low and high display values of ``bands``: their 2nd and 98th percentiles over
        a coarse read of the whole source (computed once)."""
        if self._stretch is None:
            head = self.reader.header()
            scale = max(head.width, head.height) / STRETCH_SIDE
            if scale > 1:
                width, height = (
                    max(1, round(head.width / scale)),
                    max(1, round(head.height / scale)),
                )
                step = Affine.scale(head.width / width, head.height / height)
                coarse = head.transform @ step
                tile = self.reader.read(bands=bands, grid=Grid(head.crs, coarse, width, height))
            else:
                tile = self.reader.read(bands=bands)
            pixels = tile.array.reshape(-1, tile.array.shape[-1]).astype(np.float32)
            if tile.valid is not None:
                pixels = pixels[tile.valid.reshape(-1)]
            if not len(pixels):
                pixels = np.zeros((1, len(bands)), np.float32)
            self._stretch = np.percentile(pixels, [2, 98], axis=0)
        return self._stretch

    def close(self) -> None:
        self._pool.submit(self.reader.close)
        self._pool.shutdown(wait=False)


def _enter_gdal() -> None:
    """One GDAL environment for the life of a source's thread."""
    gdal.env().__enter__()


class MapService:
    """A replica's map layers: allowed sources, native predictions, rendered tiles, cache."""

    def __init__(
        self,
        config: Any,
        segmenter: Segmenter,
        infer: Callable[[np.ndarray], Awaitable[np.ndarray]],
    ) -> None:
        """``segmenter`` prepares, joins and renders; ``infer`` runs a stack of windows (the
        replica's batched model calls)."""
        self.config, self.segmenter, self.infer = config, segmenter, infer
        self.card, self.window = segmenter.card, segmenter.window
        self.bands = config.bands or self.card.bands  # what the model reads of every source
        self.allowed = normalise_prefixes(config.allowed_sources)
        self.cache = TileCache(config.tile_cache_bytes)
        self.margin = self._margin()
        self.model_runs = 0
        self._sources: collections.OrderedDict[tuple[str, str], MapSource] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._pending: dict[tuple, asyncio.Future] = {}

    def _margin(self) -> int:
        """Pixels read around a native tile: at least the bulk job's overlap at this model's
        window (half a window where the model takes any size)."""
        if self.window is None:
            return tiling.OVERLAP
        return max(tiling.default_overlap(self.window), min(self.config.overlap, min(self.window)))

    # --- sources ----------------------------------------------------------------------------

    async def source(self, url: str, tms: str) -> MapSource:
        """The open source ``url`` names, after the allow-list; 403, 404 or 415 if none."""
        uri = check_source(url, self.allowed)
        fs = self.config.fs(uri)
        identity = await asyncio.to_thread(_identity, uri, fs)
        with self._lock:
            found = self._sources.get((uri, tms))
            if found is not None and found.identity == identity:
                self._sources.move_to_end((uri, tms))
                return found
        try:
            source = MapSource(uri, fs, tms, identity)
        except ConfigError as err:
            raise ApiError(404, "not found", str(err)) from None
        try:
            await source.call(source.tiles.info)
        except (ConfigError, TileError, SegrayError) as err:
            source.close()
            raise ApiError(415, "unsupported source", str(err)) from None
        except Exception as err:  # GDAL/rasterio: not a GeoTIFF, unreadable
            source.close()
            detail = f"{url}: cannot be read as a GeoTIFF/COG ({type(err).__name__}: {err})"
            raise ApiError(415, "unsupported source", detail) from None
        with self._lock:
            old = self._sources.pop((uri, tms), None)
            self._sources[(uri, tms)] = source
            while len(self._sources) > OPEN_SOURCES:
                _, gone = self._sources.popitem(last=False)
                gone.close()
        if old is not None:
            old.close()
        return source

    def model_minzoom(self, source: MapSource) -> int:
        """The smallest zoom of the model layers on ``source``."""
        info = source.tiles.info()
        return max(info.minzoom, info.maxzoom - MAX_ZOOM_OUT)

    # --- predictions on native tiles --------------------------------------------------------

    async def prediction(
        self, source: MapSource, x: int, y: int, bands: tuple[int, ...] | None = None
    ) -> Prediction:
        """The model on native tile (x, y), read with the margin (``bands``: the source's bands
        the model reads, default ``--bands``, else the card's); cached, and run once for
        concurrent requests of the same tile."""
        z = source.tiles.info().maxzoom
        bands = bands or self.bands
        key = ("prediction", source.key, self.card.version, bands, z, x, y)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            result = await self._predict(source, z, x, y, bands)
            self.cache.put(key, result, result.nbytes)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._pending.pop(key, None)

    async def _predict(
        self, source: MapSource, z: int, x: int, y: int, bands: tuple[int, ...] | None
    ) -> Prediction:
        m, size, k = self.margin, TILE_SIZE, self.card.num_classes
        if not source.tiles.intersects(z, x, y):
            return _empty(size, k)
        tile = await source.call(
            lambda: source.tiles.read(z, x, y, size=size, margin=m, bands=bands)
        )
        try:
            windows = await asyncio.to_thread(self.segmenter.prepare, tile)
        except TileError as err:
            raise tile_error(err) from err
        if windows.valid is not None and not windows.valid.any():  # completed by prepare
            return _empty(size, k)
        logits = await self.infer(windows.stack)
        self.model_runs += 1
        return await asyncio.to_thread(self._finish, windows, logits)

    def _finish(self, windows: Windows, logits: np.ndarray) -> Prediction:
        m, size, render = self.margin, TILE_SIZE, self.segmenter.render
        full = self.segmenter.join(windows, logits)[None, m : m + size, m : m + size]
        classes = render(full, "classes")[0]
        probs = [render(full, "probability", c)[0] for c in range(self.card.num_classes)]
        return Prediction(classes, np.stack(probs, axis=-1))

    async def view(
        self,
        source: MapSource,
        z: int,
        x: int,
        y: int,
        size: int,
        bands: tuple[int, ...] | None = None,
    ) -> Prediction:
        """The prediction of tile z/x/y at ``size`` px, made from native tiles (``bands``: as
        :meth:`prediction` takes them)."""
        import morecantile

        tms, native = source.tiles.tms, source.tiles.info().maxzoom
        if z >= native:
            factor = 2 ** (z - native)
            if factor > 2**MAX_ZOOM_IN:
                raise ApiError(404, "not found", f"zoom {z} is over {native + MAX_ZOOM_IN}")
            parent = tms.parent(morecantile.Tile(x, y, z), zoom=native)[0] if factor > 1 else None
            px, py = (parent.x, parent.y) if parent else (x, y)
            whole = await self.prediction(source, px, py, bands)
            part = TILE_SIZE // factor
            oy, ox = (y - py * factor) * part, (x - px * factor) * part
            cut = _crop(whole, oy, ox, part)
            return _resize(cut, size)
        factor = 2 ** (native - z)
        if native - z > MAX_ZOOM_OUT:
            minzoom = native - MAX_ZOOM_OUT
            detail = f"the model layers start at zoom {minzoom} on this source; zoom in"
            raise ApiError(404, "not found", detail)
        children = tms.children(morecantile.Tile(x, y, z), zoom=native)
        parts = await asyncio.gather(*(self.prediction(source, c.x, c.y, bands) for c in children))
        side = TILE_SIZE * factor
        classes = np.full((side, side), inference.NODATA, np.uint8)
        probs = np.zeros((side, side, self.card.num_classes), np.uint8)
        for child, part in zip(children, parts, strict=True):
            r, c = (child.y - y * factor) * TILE_SIZE, (child.x - x * factor) * TILE_SIZE
            classes[r : r + TILE_SIZE, c : c + TILE_SIZE] = part.classes
            probs[r : r + TILE_SIZE, c : c + TILE_SIZE] = part.probabilities
        return _resize(Prediction(classes, probs), size)

    # --- layers ----------------------------------------------------------------------------

    def render_mask(self, prediction: Prediction) -> np.ndarray:
        """RGBA of class ids in the palette; background and no data transparent."""
        palette = np.array(_palette(self.card.num_classes), np.uint8)
        classes = prediction.classes
        rgba = np.zeros((*classes.shape, 4), np.uint8)
        shown = (classes != inference.NODATA) & (classes != 0)
        rgba[shown, :3] = palette[classes[shown] % len(palette)]
        rgba[shown, 3] = 255
        return rgba

    def render_probability(self, prediction: Prediction, class_index: int) -> np.ndarray:
        """RGBA of one class's probability on the ramp; no data transparent."""
        p = (
            prediction.probabilities[..., class_index].astype(np.float32)
            / inference.PROBABILITY_MAX
        )
        rgba = np.zeros((*p.shape, 4), np.uint8)
        rgba[..., :3] = _ramp(p)
        rgba[..., 3] = np.where(prediction.classes == inference.NODATA, 0, 255)
        return rgba

    def check_bands(self, source: MapSource, bidx: str | None) -> tuple[int, ...] | None:
        """The bands a request's ``bidx`` (TiTiler's parameter: ``3,2,1``) selects, checked
        against the model and the source; None without it."""
        if not bidx:
            return None
        try:
            bands = tuple(int(b) for b in bidx.split(","))
        except ValueError:
            bands = ()
        if not bands or min(bands) < 1:
            detail = (
                f"bidx must be 1-based band numbers separated by commas, e.g. 3,2,1; got {bidx!r}"
            )
            raise ApiError(400, "invalid request", detail)
        if len(bands) != self.card.channels:
            detail = f"bidx gives {len(bands)} band(s); the model reads {self.card.channels}"
            raise ApiError(400, "invalid request", detail)
        count = source.reader.header().count
        if max(bands) > count:
            detail = f"bidx band {max(bands)}: {source.uri} has {count} band(s)"
            raise ApiError(400, "invalid request", detail)
        return bands

    def image_bands(self, count: int, bands: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The source bands shown as RGB: the first three the model reads (``bands``, else
        ``--bands``, else the card's), or its one, as grey."""
        bands = tuple(bands or self.bands or range(1, count + 1))
        return bands[:3] if len(bands) >= 3 else bands[:1] * 3

    def read_image(
        self,
        source: MapSource,
        z: int,
        x: int,
        y: int,
        size: int,
        bands: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """RGBA of the source for the eye (in the source's thread)."""
        head = source.reader.header()
        bands = self.image_bands(head.count, bands)
        tile = source.tiles.read(z, x, y, size=size, bands=bands)
        low, high = source.stretch(bands)
        span = np.maximum(high - low, 1e-6)
        scaled = (tile.array.astype(np.float32) - low) / span
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3] = np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8)
        rgba[..., 3] = 255 if tile.valid is None else np.where(tile.valid, 255, 0)
        return rgba

    def read_precomputed(self, source: MapSource, z: int, x: int, y: int, size: int) -> np.ndarray:
        """RGBA of a mask raster (band 1, class ids) in the palette (in the source's thread); a
        source that is no class mask (:func:`not_a_class_mask`, or ids beyond the model's
        classes in this tile) is refused."""
        why = not_a_class_mask(source.reader)
        tile = source.tiles.read(z, x, y, size=size, bands=(1,)) if not why else None
        classes = tile.array[..., 0].astype(np.uint8) if tile else np.zeros((0,), np.uint8)
        if tile and tile.valid is not None:
            classes = np.where(tile.valid, classes, inference.NODATA).astype(np.uint8)
        ids = classes[classes != inference.NODATA]
        if not why and ids.size and int(ids.max()) >= self.card.num_classes:
            top, classes_n = int(ids.max()), self.card.num_classes
            why = f"it holds values up to {top}, where the model has {classes_n} classes"
        if why:
            raise ApiError(
                400,
                "invalid source",
                f"layer=precomputed draws a class mask (one uint8 band of class ids, as segray "
                f"predict writes); {source.uri}: {why}",
            )
        return self.render_mask(Prediction(classes, np.zeros((*classes.shape, 0), np.uint8)))


def not_a_class_mask(reader: Any) -> str | None:
    """Why a raster's header says it is no class mask (more than one band, pixels that are not
    uint8), or None."""
    head = reader.header()
    if head.count != 1:
        return f"it has {head.count} bands"
    if head.dtype != "uint8":
        return f"its pixels are {head.dtype}"
    return None


def _identity(uri: str, fs: Any) -> tuple:
    """What tells one version of a source from the next: size and mtime of a local file; an
    S3 object is taken as it was when first opened. 404 when it is missing, 400 when it is no
    regular file (a named pipe would block the read for ever)."""
    if not storage.is_s3(uri):
        kind = fs.not_files([uri]).get(uri)
        if kind:
            raise ApiError(400, "invalid source", f"{uri} is a {kind}, not a GeoTIFF")
        try:
            stat = os.stat(uri)
        except OSError:
            raise ApiError(404, "not found", f"no such source: {uri}") from None
        return (stat.st_size, stat.st_mtime_ns)
    if not fs.exists(uri):
        raise ApiError(404, "not found", f"no such source: {uri}")
    return ()


def _empty(size: int, classes: int) -> Prediction:
    return Prediction(
        np.full((size, size), inference.NODATA, np.uint8), np.zeros((size, size, classes), np.uint8)
    )


def _crop(prediction: Prediction, row: int, col: int, side: int) -> Prediction:
    at = (slice(row, row + side), slice(col, col + side))
    return Prediction(prediction.classes[at], prediction.probabilities[at])


def _resize(prediction: Prediction, size: int) -> Prediction:
    """Nearest-neighbour to ``size`` px: repeat to grow, every n-th pixel to shrink."""
    side = prediction.classes.shape[0]
    if side == size:
        return prediction
    if side < size:
        n = size // side
        grow = lambda a: np.repeat(np.repeat(a, n, axis=0), n, axis=1)  # noqa: E731
        return Prediction(grow(prediction.classes), grow(prediction.probabilities))
    n = side // size
    start = n // 2
    return Prediction(
        prediction.classes[start::n, start::n], prediction.probabilities[start::n, start::n]
    )


def _palette(count: int) -> list[tuple[int, int, int]]:
    return [inference.PALETTE[i % len(inference.PALETTE)] for i in range(count)]


def _ramp(p: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of values 0..1 on :data:`RAMP`, linearly between anchors."""
    at = np.clip(p, 0, 1) * (len(RAMP) - 1)
    low = np.minimum(at.astype(np.int64), len(RAMP) - 2)
    t = (at - low)[..., None]
    return (RAMP[low] * (1 - t) + RAMP[low + 1] * t + 0.5).astype(np.uint8)


def encode_rgba(rgba: np.ndarray) -> bytes:
    """A PNG of an RGBA tile, compressed lightly (tiles are many and small)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def etag(*parts: object) -> str:
    """A strong ETag of what makes a tile: source version, model version, layer, z/x/y."""
    return '"' + hashlib.sha1(repr(parts).encode()).hexdigest()[:24] + '"'
