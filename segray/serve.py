"""The online path: a Ray Serve deployment that segments one posted tile per HTTP request.

Bytes are checked before decoding, decoded by :mod:`segray.imagery` and run through
:mod:`segray.inference` in dynamic batches, so a mask from Serve equals the bulk path's. An image
of another size than the model's input is windowed exactly as the bulk ``Predictor`` does it
(reflect-padded up to the window, model-sized windows overlapping by ``overlap``, stitched back by
:func:`segray.tiling.stitch` and cropped); the windows of every request in a batch run together.

Status codes: 400 malformed request (empty body, truncated or corrupt image, bad multipart body or
query); 415 bytes that are no usable image (not PNG/JPEG/TIFF, unsupported pixel type, mode or band
count, or bands the model cannot take); 413 body over ``max_body_bytes`` or image over
``max_pixels``; 401 missing or wrong bearer token on ``/v1/*``. Errors are JSON
``{"error": ..., "detail": ...}``.
"""

import asyncio
import collections
import dataclasses
import hmac
import inspect
import os
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from segray import imagery, inference, tiling
from segray.imagery import Tile, TileError

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Largest image accepted, in pixels: larger scenes belong to the bulk path.
MAX_PIXELS = 4096 * 4096
FORMATS = ("png", "json")
TOKEN_ENV = "SEGRAY_API_TOKEN"
DEPLOYMENT = "SegmentModel"
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


class ApiError(Exception):
    """A refused request: HTTP ``status`` with the JSON body ``{"error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    body = {"error": exc.error, "detail": exc.detail}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": "invalid request", "detail": detail}, status_code=400)


# TileError reasons of imagery.decode and inference.prepare, by how their text starts.
_TILE_ERRORS = (
    ("empty", 400, "empty body"),
    ("not an image", 415, "unsupported media type"),
    ("image too large", 413, "image too large"),
    ("corrupt or truncated", 400, "corrupt or truncated image"),
    ("image has no pixels", 400, "empty image"),
    ("unsupported", 415, "unsupported image"),
    ("band selection", 415, "unsupported band count"),
    ("has ", 415, "unsupported band count"),
)


def tile_error(err: TileError) -> ApiError:
    """The HTTP error for a tile that cannot be used."""
    for start, status, error in _TILE_ERRORS:
        if err.reason.startswith(start):
            return ApiError(status, error, err.reason)
    return ApiError(400, "invalid image", err.reason)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    detail = f"body of {size} bytes exceeds the limit of {limit} bytes"
    return ApiError(413, "body too large", detail)


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image in a request body: the body itself, or the file part of a multipart form."""
    if not content_type.lower().startswith("multipart/"):
        return body
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ApiError(400, "invalid multipart body", "Content-Type has no boundary")
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        headers = BytesHeaderParser().parsebytes(head.lstrip(b"\r\n") + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if sep and (headers.get_filename() or name in ("file", "image")):
            return data.removesuffix(b"\r\n")
    raise ApiError(400, "invalid multipart body", "no file part: send the image as field 'file'")


def cut(
    array: np.ndarray, window: tuple[int, int] | None, overlap: int
) -> list[tuple[tiling.Window, np.ndarray]]:
    """Model-sized windows of a prepared (H, W, C) array, as the bulk ``Predictor`` cuts them."""
    h, w = array.shape[:2]
    if window is None or (h, w) == window:
        return [(tiling.Window(0, 0, h, w), array)]
    ph, pw = max(0, window[0] - h), max(0, window[1] - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "edge"
        array = np.pad(array, ((0, ph), (0, pw), (0, 0)), mode=mode)
    wins = tiling.scene_windows(*array.shape[:2], window, overlap)
    return [(win, array[win.slices]) for win in wins]


def join(
    shape: tuple[int, int],
    parts: list[tuple[tiling.Window, np.ndarray]],
    window: tuple[int, int] | None,
    overlap: int,
    blend: str,
) -> np.ndarray:
    """Logits (H, W, K) of an image of ``shape`` from its windows' logits (inverse of ``cut``)."""
    h, w = shape
    if len(parts) == 1 and parts[0][1].shape[:2] == (h, w):
        return parts[0][1]
    height, width = max(h, window[0]), max(w, window[1])
    return tiling.stitch(parts, height, width, window, overlap, blend)[:h, :w]


def mask_polygons(mask: np.ndarray, class_index: int, name: str, tile: Tile) -> dict[str, Any]:
    """GeoJSON of the pixels where ``mask`` is 1: in the tile's CRS, else in pixel coordinates.

    Pixel coordinates are (x = column, y = row) of pixel corners, y pointing down.
    """
    from affine import Affine
    from rasterio import features

    transform = tile.transform if tile.georeferenced else Affine.identity()
    shapes = features.shapes(mask, mask=mask.astype(bool), transform=transform)
    props = {"class": class_index, "name": name}
    feats = [{"type": "Feature", "geometry": g, "properties": props} for g, _ in shapes]
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if tile.georeferenced:
        doc["crs"] = {"type": "name", "properties": {"name": tile.crs}}
    return doc


def response_format(fmt: str | None, accept: str) -> str:
    """``fmt`` when given, else json when the client accepts JSON and not PNG, else png."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ApiError(400, "invalid request", f"format must be one of {FORMATS}; got {fmt!r}")
        return fmt
    accept = accept.lower()
    return "json" if "application/json" in accept and "image/png" not in accept else "png"


def bulk_stitching(overlap: int | None, blend: str | None) -> tuple[int, str]:
    """Window overlap and blend, each defaulting to the bulk path's so that masks agree."""
    from segray.predict import PredictConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PredictConfig)}
    return (
        defaults["overlap"] if overlap is None else overlap,
        defaults["blend"] if blend is None else blend,
    )


def _gpu_memory_growth() -> None:
    """Let replicas share a GPU (``num_gpus`` < 1): TensorFlow otherwise takes all its memory."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass


# Serve pickles the routes when the class is decorated: what they call must be defined above.
@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class SegmentModel:
    """One replica: the model loaded once by URI, requests batched through ``inference.infer``."""

    def __init__(
        self,
        model_uri: str,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_pixels: int = MAX_PIXELS,
        overlap: int | None = None,
        blend: str | None = None,
        api_token: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        from segray import modelio

        _gpu_memory_growth()
        self.model, self.card = modelio.load_model(model_uri, endpoint=endpoint)
        size = tuple(self.model.input_shape[1:3])
        self.window = size if all(isinstance(v, int) for v in size) else None
        overlap, self.blend = bulk_stitching(overlap, blend)
        self.overlap = min(overlap, min(self.window) // 2) if self.window else 0
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.max_body_bytes, self.max_pixels = max_body_bytes, max_pixels
        self.token = api_token or os.environ.get(TOKEN_ENV) or None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._infer_batch.set_max_batch_size(max_batch_size)
        self._infer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._run_windows(np.zeros((1, *self.card.input_shape), np.float32))  # warm up

    @app.get("/healthz")
    def healthz(self) -> dict:
        """Liveness: open to all, no token needed."""
        return {"status": "ok", "model": self.card.name, "version": self.card.version}

    @app.get("/v1/model")
    def model_info(self, request: Request) -> dict:
        """The model served: name, classes, input size, channels, version."""
        self._authorize(request)
        card = self.card
        return {
            "name": card.name,
            "version": card.version,
            "classes": card.names(),
            "num_classes": card.num_classes,
            "input_size": list(self.card.input_shape[:2]),
            "channels": card.channels,
            "bands": list(card.bands) if card.bands else None,
            "threshold": card.threshold,
        }

    @app.get("/v1/stats")
    def stats(self, request: Request) -> dict:
        """This replica's batch-size histogram (requests per model batch)."""
        self._authorize(request)
        return self.batch_stats()

    def batch_stats(self) -> dict:
        """Batch sizes run so far ``{size: count}`` and batch settings; callable by handle."""
        return {
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
        }

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
        body = await read_body(request, self.max_body_bytes)
        data = image_bytes(body, request.headers.get("content-type", ""))
        tile, wins, windows = await asyncio.to_thread(self._prepare, data)
        logits = await self._infer_batch(windows)
        options = (fmt, output, class_index, threshold)
        return await asyncio.to_thread(
            self._respond, tile, list(zip(wins, logits, strict=True)), options
        )

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

    def _prepare(self, data: bytes) -> tuple[Tile, list[tiling.Window], np.ndarray]:
        if not data:
            raise ApiError(400, "empty body", "the request has no image bytes")
        if imagery.sniff(data) is None:
            raise ApiError(415, "unsupported media type", "body is not a PNG, JPEG or TIFF image")
        try:
            tile = imagery.decode(data, "request body", max_pixels=self.max_pixels)
            array = inference.prepare(tile, self.card)
        except TileError as err:
            raise tile_error(err) from err
        parts = cut(array, self.window, self.overlap)
        return tile, [p[0] for p in parts], np.stack([p[1] for p in parts])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(items)] += 1
        return await asyncio.to_thread(self._run_items, items)

    def _run_items(self, items: list[np.ndarray]) -> list[np.ndarray]:
        # Windows of one shape share model calls: all of them when the model has a fixed size.
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.shape[1:], []).append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(items)
        for rows in groups.values():
            logits = self._run_windows(np.concatenate([items[i] for i in rows]))
            splits = np.cumsum([len(items[i]) for i in rows])[:-1]
            for i, part in zip(rows, np.split(logits, splits), strict=True):
                out[i] = part
        return out

    def _run_windows(self, windows: np.ndarray) -> np.ndarray:
        step = max(self.max_batch_size, 1)
        parts = [
            inference.infer(self.model, windows[i : i + step], self.card)
            for i in range(0, len(windows), step)
        ]
        return np.concatenate(parts)

    def _respond(
        self, tile: Tile, parts: list[tuple[tiling.Window, np.ndarray]], options: tuple
    ) -> Response:
        fmt, output, class_index, threshold = options
        shape = tile.array.shape[:2]
        full = join(shape, parts, self.window, self.overlap, self.blend)[None]
        headers = {"X-Segray-Model-Version": self.card.version}
        if fmt == "png":
            index = 1 if class_index is None else class_index
            mask = inference.render(full, self.card, output, index, threshold)[0]
            return Response(imagery.encode_png(mask), media_type="image/png", headers=headers)
        return JSONResponse(self._summary(tile, full, class_index, threshold), headers=headers)

    def _summary(
        self, tile: Tile, logits: np.ndarray, class_index: int | None, threshold: float | None
    ) -> dict:
        names = self.card.names()
        mask = inference.render(logits, self.card, "classes")[0]
        fractions = inference.class_fractions(mask, self.card.num_classes)
        doc: dict[str, Any] = {
            "shape": list(mask.shape),
            "model": {"name": self.card.name, "version": self.card.version},
            "classes": names,
            "fractions": dict(zip(names, fractions, strict=True)),
            "crs": tile.crs if tile.georeferenced else None,
        }
        if class_index is not None:
            binary = inference.render(logits, self.card, "binary", class_index, threshold)[0]
            doc["class"] = class_index
            doc["polygons"] = mask_polygons(binary, class_index, names[class_index], tile)
        return doc


def build_app(
    model_uri: str,
    *,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.01,
    replicas: int | dict[str, Any] = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    max_ongoing_requests: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_pixels: int = MAX_PIXELS,
    overlap: int | None = None,
    blend: str | None = None,
    api_token: str | None = None,
    endpoint: str | None = None,
) -> serve.Application:
    """The segmentation app, ready for ``serve.run``.

    ``replicas`` is a fixed count, or an autoscaling config (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests`` - default ``max_batch_size`` so batches fill before scaling out).
    ``max_ongoing_requests`` defaults to ``max(32, 4 * max_batch_size)``: Serve's own default of 5
    would cap every batch at 5. ``overlap`` and ``blend`` (for images of another size than the
    model's input) default to the bulk path's. ``api_token`` defaults to ``$SEGRAY_API_TOKEN``.
    """
    _check_positive(max_batch_size=max_batch_size, max_body_bytes=max_body_bytes)
    _check_positive(max_pixels=max_pixels, max_ongoing_requests=max_ongoing_requests or 1)
    numbers = {
        "batch_wait_timeout_s": batch_wait_timeout_s,
        "num_gpus": num_gpus,
        "overlap": overlap or 0,
    }
    for field, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{field} must be a number >= 0; got {value!r}")
    if blend is not None and blend not in tiling.BLENDS:
        raise ValueError(f"blend must be one of {tiling.BLENDS}; got {blend!r}")
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests or max(32, 4 * max_batch_size),
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    if isinstance(replicas, dict):
        options["autoscaling_config"] = {"target_ongoing_requests": max_batch_size, **replicas}
    else:
        _check_positive(replicas=replicas)
        options["num_replicas"] = replicas
    return SegmentModel.options(**options).bind(
        model_uri,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_body_bytes=max_body_bytes,
        max_pixels=max_pixels,
        overlap=overlap,
        blend=blend,
        api_token=api_token or os.environ.get(TOKEN_ENV) or None,
        endpoint=endpoint,
    )


def _check_positive(**values: Any) -> None:
    for field, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1; got {value!r}")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Build the app from the ``args:`` of a ``serve run`` / ``serve deploy`` config."""
    allowed = tuple(inspect.signature(build_app).parameters)
    if set(args) - set(allowed) or "model_uri" not in args:
        raise ValueError(f"serve args need model_uri and allow {allowed}; got {sorted(args)}")
    args = dict(args)
    return build_app(args.pop("model_uri"), **args)


def run(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    blocking: bool = True,
    name: str = "segray",
    route_prefix: str = "/",
    **options: Any,
) -> DeploymentHandle:
    """Serve ``model_uri`` on http://host:port (joining or starting Ray); ``options`` as
    :func:`build_app`. With ``blocking`` it serves until interrupted."""
    from segray.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": host, "port": port})
    application = build_app(model_uri, **options)
    return serve.run(application, name=name, route_prefix=route_prefix, blocking=blocking)
