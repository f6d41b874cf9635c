"""HTTP for the online endpoint: refused requests as JSON errors, the status taken from an error's
type and kind (never its text), bodies read under a size limit, multipart file parts, formats."""

from __future__ import annotations

import asyncio
import logging
from email.message import Message

from fastapi import Request
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect

from segray.errors import TileError

log = logging.getLogger("segray.serve")
FORMATS = ("png", "json")

#: HTTP status and short error of each kind of tile error.
TILE_STATUS: dict[str, tuple[int, str]] = {
    "empty": (400, "empty image"),
    "not_image": (415, "unsupported media type"),
    "corrupt": (400, "corrupt or truncated image"),
    "too_large": (413, "image too large"),
    "pixel_type": (415, "unsupported image"),
    "bands": (415, "unsupported band count"),
    "unreadable": (400, "invalid image"),
    "labels": (400, "invalid image"),
}


class ApiError(Exception):
    """A refused request: HTTP ``status`` with the JSON body ``{"error", "detail"}``."""

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def tile_error(err: TileError) -> ApiError:
    """The HTTP error for a tile that cannot be used, by its kind."""
    status, error = TILE_STATUS[err.kind]
    return ApiError(status, error, err.reason)


async def read_body(
    request: Request, limit: int, timeout_s: float = 30.0, chunk_timeout_s: float = 10.0
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and
    with 408 when it takes over ``timeout_s`` in all or stalls ``chunk_timeout_s`` between two
    chunks: a slow client cannot hold a replica's request slot for longer. A client that goes
    away gets 499 (nobody reads it; the access log shows one line)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(chunk_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            detail = (
                f"the body stalled after {size} bytes (limits: {timeout_s:g} s in all, "
                f"{chunk_timeout_s:g} s between chunks)"
            )
            raise ApiError(408, "request timeout", detail) from None
        except (ClientDisconnect, TaskCancelledError):
            # Serve's replica can learn of the disconnect as its pull of the next chunk from the
            # proxy being cancelled (a race with the proxy's own 499): the same departure.
            log.info("client went away after sending %d bytes of its body", size)
            raise ApiError(499, "client closed request", f"after {size} bytes") from None
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    detail = f"body of {size} bytes exceeds the limit of {limit} bytes"
    return ApiError(413, "body too large", detail)


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image in a request body: the body itself, or the one file part of a multipart form.

    Multipart bodies are parsed by python-multipart, strictly: the body must close with its
    final boundary and carry exactly one file (a part with a filename, or named ``file`` or
    ``image``); other form fields are ignored. Anything else is a 400 that says why.
    """
    if not content_type.lower().startswith("multipart/"):
        return body
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ApiError(400, "invalid multipart body", "Content-Type has no boundary")
    parts, closed = _multipart_parts(body, boundary)
    if not closed:
        raise ApiError(400, "invalid multipart body", "the body ends before its final boundary")
    files = [data for disposition, data in parts if _is_file(disposition)]
    if len(files) != 1:
        detail = (
            "no file part: send the image as field 'file'"
            if not files
            else (f"{len(files)} file parts: send one image per request")
        )
        raise ApiError(400, "invalid multipart body", detail)
    return files[0]


def _multipart_parts(body: bytes, boundary: str) -> tuple[list[tuple[str, bytes]], bool]:
    """``([(content-disposition, data) per part], whether the final boundary came)``."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    parts: list[tuple[str, bytearray]] = []
    field, value, closed = bytearray(), bytearray(), [False]

    def on_part_begin() -> None:
        parts.append(("", bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        if field.decode("latin-1").strip().lower() == "content-disposition":
            parts[-1] = (value.decode("latin-1"), parts[-1][1])
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    def on_end() -> None:
        closed[0] = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "invalid multipart body", str(exc)) from None
    return [(d, bytes(data)) for d, data in parts], closed[0]


def _is_file(disposition: str) -> bool:
    header = Message()
    header["content-disposition"] = disposition
    name = header.get_param("name", header="content-disposition")
    return bool(header.get_filename()) or name in ("file", "image")


def response_format(fmt: str | None, accept: str) -> str:
    """``fmt`` when given, else json when the client accepts JSON and not PNG, else png."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ApiError(400, "invalid request", f"format must be one of {FORMATS}; got {fmt!r}")
        return fmt
    accept = accept.lower()
    return "json" if "application/json" in accept and "image/png" not in accept else "png"
