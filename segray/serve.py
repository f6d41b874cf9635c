"""The online path: a Ray Serve deployment that segments one posted tile per HTTP request.

Bytes are checked before decoding, decoded by :mod:`segray.imagery` and run through
:mod:`segray.inference` in dynamic batches, so a mask from Serve equals the bulk path's. An image
of another size than the model's input is windowed by :func:`segray.tiling.cut_windows` and
stitched back by :func:`segray.tiling.join_windows`, as the bulk ``Predictor`` does it; the windows
of every request in a batch run together. JSON polygons are :func:`segray.inference.footprint_doc`,
as bulk ``--footprints`` writes them.

Status codes: 400 malformed request (empty body, truncated or corrupt image, bad multipart body or
query); 415 bytes that are no usable image (not PNG/JPEG/TIFF, unsupported pixel type, mode or band
count, or bands the model cannot take); 413 body over ``max_body_bytes`` or image over
``max_pixels``; 401 missing or wrong bearer token on ``/v1/*``. Errors are JSON
``{"error": ..., "detail": ...}``.
"""

import asyncio
import collections
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


def response_format(fmt: str | None, accept: str) -> str:
    """``fmt`` when given, else json when the client accepts JSON and not PNG, else png."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ApiError(400, "invalid request", f"format must be one of {FORMATS}; got {fmt!r}")
        return fmt
    accept = accept.lower()
    return "json" if "application/json" in accept and "image/png" not in accept else "png"


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
        overlap: int = tiling.OVERLAP,
        blend: str = tiling.BLEND,
        api_token: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.model, self.card = inference.load(model_uri, endpoint=endpoint)
        self.window = inference.model_window(self.model)
        self.overlap, self.blend = overlap, blend
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.max_body_bytes, self.max_pixels = max_body_bytes, max_pixels
        self.token = api_token or os.environ.get(TOKEN_ENV) or None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._infer_batch.set_max_batch_size(max_batch_size)
        self._infer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        inference.warm_up(self.model, self.card, max_batch_size)

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
        tile, layout, windows = await asyncio.to_thread(self._prepare, data)
        logits = await self._infer_batch(windows)
        if isinstance(logits, Exception):  # this request's shape group failed, not the batch
            raise logits
        options = (fmt, output, class_index, threshold)
        return await asyncio.to_thread(self._respond, tile, layout, logits, options)

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

    def _prepare(self, data: bytes) -> tuple[Tile, tiling.Layout, np.ndarray]:
        if not data:
            raise ApiError(400, "empty body", "the request has no image bytes")
        if imagery.sniff(data) is None:
            raise ApiError(415, "unsupported media type", "body is not a PNG, JPEG or TIFF image")
        try:
            tile = imagery.decode(data, "request body", max_pixels=self.max_pixels)
            array = inference.prepare(tile, self.card)
        except TileError as err:
            raise tile_error(err) from err
        windows, layout = tiling.cut_windows(array, self.window, self.overlap)
        return tile, layout, windows

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer_batch(self, items: list[np.ndarray]) -> list[np.ndarray | Exception]:
        self.batch_sizes[len(items)] += 1
        return await asyncio.to_thread(
            inference.infer_stacks, self.model, items, self.card, self.max_batch_size
        )

    def _respond(
        self, tile: Tile, layout: tiling.Layout, logits: np.ndarray, options: tuple
    ) -> Response:
        fmt, output, class_index, threshold = options
        full = tiling.join_windows(logits, layout, self.blend)[None]
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
        mask = inference.render(logits, self.card, "classes", threshold=threshold)[0]
        fractions = inference.class_fractions(mask, self.card.num_classes)
        doc: dict[str, Any] = {
            "shape": list(mask.shape),
            "model": {"name": self.card.name, "version": self.card.version},
            "classes": names,
            "fractions": dict(zip(names, fractions, strict=True)),
            "crs": tile.crs if tile.georeferenced else None,
        }
        if class_index is not None:
            doc["class"] = class_index
            doc["polygons"] = inference.footprint_doc(mask, tile, class_index, names[class_index])
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
    overlap: int = tiling.OVERLAP,
    blend: str = tiling.BLEND,
    api_token: str | None = None,
    endpoint: str | None = None,
) -> serve.Application:
    """The segmentation app, ready for ``serve.run``.

    ``replicas`` is a fixed count, or an autoscaling config (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests`` - default ``max_batch_size`` so batches fill before scaling out).
    ``max_ongoing_requests`` defaults to ``max(32, 4 * max_batch_size)``: Serve's own default of 5
    would cap every batch at 5. ``overlap`` and ``blend`` (for images of another size than the
    model's input) default to the bulk path's, :data:`segray.tiling.OVERLAP` and ``BLEND``.
    ``api_token`` defaults to ``$SEGRAY_API_TOKEN``.
    """
    _check_positive(max_batch_size=max_batch_size, max_body_bytes=max_body_bytes)
    _check_positive(max_pixels=max_pixels, max_ongoing_requests=max_ongoing_requests or 1)
    numbers = {
        "batch_wait_timeout_s": batch_wait_timeout_s,
        "num_gpus": num_gpus,
        "overlap": overlap,
    }
    for field, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{field} must be a number >= 0; got {value!r}")
    if blend not in tiling.BLENDS:
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
