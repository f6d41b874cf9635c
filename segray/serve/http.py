"""HTTP for the online endpoint: refused requests as JSON errors, the status taken from an error's
type and kind (never its text), bodies read under a size limit, multipart file parts, formats."""

from __future__ import annotations

import asyncio
import logging
from email.message import Message
from email.parser import BytesHeaderParser

from fastapi import Request
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
        except ClientDisconnect:
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
