"""Which rasters a client may name in ``url=``: only those under an allowed prefix.

A source is a local path (or ``file://``) or ``s3://bucket/key``; anything else (``http://``,
GDAL's ``/vsi…/`` and ``DRIVER:`` forms, a NUL byte) is refused. A local path is resolved
(``..`` and symbolic links followed) before it is compared, so nothing outside an allowed
folder is reachable through a link or a dotted path; an S3 key with a ``.`` or ``..`` segment or
an empty one is refused outright (S3 does not resolve them, but a proxy might). Prefixes match at
a ``/`` boundary: ``s3://bucket/imagery`` allows ``s3://bucket/imagery/a.tif``, not
``s3://bucket/imagery-private/a.tif``. What is allowed is read only by GeoTIFF's GDAL driver
(:data:`DRIVERS`): no VRT in an allowed folder can point elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from segray.serve.http import ApiError

#: The GDAL drivers that may open a source named by a client (GeoTIFF and COG).
DRIVERS = ("GTiff",)
SETTING = "allowed_sources"
_DRIVER_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]+:")  # GDAL's NETCDF:…, GTIFF_DIR:…, vrt:…


def refuse(url: str, why: str) -> ApiError:
    """The 403 of a source outside the allow-list, naming the setting."""
    detail = f"source {url!r} {why}; allowed are the prefixes of the {SETTING} setting"
    return ApiError(403, "forbidden source", detail)


def normalise_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The allow-list as compared: local folders resolved, every prefix ending with ``/``."""
    out = []
    for prefix in prefixes:
        if prefix.startswith("s3://"):
            out.append(prefix if prefix.endswith("/") else prefix + "/")
            continue
        path = prefix[len("file://") :] if prefix.startswith("file://") else prefix
        real = os.path.realpath(os.path.expanduser(path))
        out.append(real if real.endswith("/") else real + "/")
    return tuple(out)


def check_source(url: str, allowed: Sequence[str]) -> str:
    """The URI to read for ``url`` (a resolved local path or an S3 URI), or a 403/400
    :class:`~segray.serve.http.ApiError` saying why not. ``allowed`` comes from
    :func:`normalise_prefixes`."""
    if not url:
        raise ApiError(400, "invalid request", "url is empty: name a GeoTIFF or COG")
    if "\x00" in url or any(ord(c) < 32 for c in url):
        raise ApiError(400, "invalid request", "url holds control characters")
    if not allowed:
        raise refuse(url, "cannot be read: no source is allowed")
    if url.startswith("s3://"):
        return _check_s3(url, allowed)
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path.startswith("/"):  # file://host/path names another machine
            raise refuse(url, "names a host")
    elif "://" in url or _DRIVER_PREFIX.match(url):
        raise refuse(url, "is not a local path or s3:// URI")
    else:
        path = url
    if "/vsi" in path.lower():
        raise refuse(url, "is a GDAL virtual file system path")
    real = os.path.realpath(os.path.expanduser(path))
    if not any(real == prefix.rstrip("/") or real.startswith(prefix) for prefix in allowed):
        raise refuse(url, "is outside every allowed folder")
    return real


def _check_s3(url: str, allowed: Sequence[str]) -> str:
    bucket, _, key = url[len("s3://") :].partition("/")
    segments = key.split("/")
    if not bucket or not key or any(s in ("", ".", "..") for s in segments):
        raise refuse(url, "is not a plain s3://bucket/key (empty, '.' or '..' segments)")
    if not any(url.startswith(prefix) for prefix in allowed if prefix.startswith("s3://")):
        raise refuse(url, "is outside every allowed prefix")
    return url
