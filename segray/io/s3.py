"""S3 as a :class:`~segray.io.files.FileSystem` (:class:`S3FileSystem`, bound to its endpoint):
the endpoint in force, cached boto3 clients and pyarrow filesystems, and calls that ride out an
outage (retried with capped exponential backoff for a time budget).

botocore's own retries (``standard`` mode, a few attempts) cover a dropped connection or a single
throttle; they give up within seconds, and a job then turns every tile of a short outage into an
error row. :func:`call` wraps one S3 call and retries it, as long as the failure is one a later
attempt can cure (no connection, a timeout, HTTP 5xx, throttling), until ``SEGRAY_S3_RETRY_S``
seconds (default 60) have passed since the first failure. Permanent answers (403, 404, a bad
request) are raised at once. Each process says once per outage that it is waiting.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from segray.errors import OutputFull, StorageError
from segray.io.files import FileSystem, listed, parse, suffix_tuple

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Environment variable holding the retry budget in seconds (0 turns the outer retry off).
BUDGET_ENV = "SEGRAY_S3_RETRY_S"
DEFAULT_BUDGET_S = 60.0
#: First and largest pause between two attempts, in seconds.
FIRST_PAUSE_S, MAX_PAUSE_S = 0.5, 8.0
#: Error codes that a later attempt can cure.
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)


def budget_s() -> float:
    """The retry budget in force (``SEGRAY_S3_RETRY_S``, else 60 s)."""
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_BUDGET_S
    except ValueError:
        return DEFAULT_BUDGET_S


def transient(exc: BaseException) -> bool:
    """True when a later attempt of the same call may succeed."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code", "") in TRANSIENT_CODES or status >= 500
    connection = (bx.ConnectionError, bx.HTTPClientError, bx.ResponseStreamingError)
    return isinstance(exc, (*connection, ConnectionError, TimeoutError))


_waiting = {"since": 0.0}


def call(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """``fn()``, retried while its failure is :func:`transient` and the budget lasts.

    ``what`` names the object for the log line. The last failure is raised when the budget is
    spent, so the caller's error names the object as it always did.
    """
    budget = budget_s() if budget is None else budget
    first_failure = None
    pause = FIRST_PAUSE_S
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not transient(exc):
                raise
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure + pause > budget:
                raise
            if now - _waiting["since"] > budget:  # once per outage and process
                _waiting["since"] = now
                log.warning(
                    "S3 unreachable at %s (%s): retrying for up to %.0f s", what, exc, budget
                )
            time.sleep(pause * random.uniform(0.8, 1.2))
            pause = min(pause * 2, MAX_PAUSE_S)
            continue
        return result


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint in force: argument, ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},  # quick ones; retry.call rides outages
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client(endpoint: str | None = None) -> Any:
    """A cached boto3 S3 client for the endpoint in force (see :func:`resolve_endpoint`)."""
    return _client(resolve_endpoint(endpoint))


def s3_filesystem(endpoint: str | None = None) -> pyarrow.fs.S3FileSystem:
    """A pyarrow ``S3FileSystem`` for the endpoint in force, with boto3's resolved credentials."""
    import boto3
    import pyarrow.fs as pafs

    url = resolve_endpoint(endpoint)
    session = boto3.session.Session()
    kwargs: dict[str, Any] = {
        "region": session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    if url:
        parsed = urlparse(url)
        kwargs.update(endpoint_override=parsed.netloc or url, scheme=parsed.scheme or "https")
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def _error(uri: str, exc: Exception) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return StorageError(f"{uri}: S3 error {code}: {exc}")


def _write_error(uri: str, exc: Exception) -> StorageError:
    """A failed write; :class:`OutputFull` when no later write can succeed (the bucket is gone:
    a job stops with its receipt instead of failing every tile one by one)."""
    if _code(exc) == "NoSuchBucket" or "NoSuchBucket" in str(exc):
        return OutputFull(f"{uri}: cannot write: the bucket is gone (S3 error NoSuchBucket)")
    return _error(uri, exc)


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


@dataclass(frozen=True)
class S3FileSystem(FileSystem):
    """Objects of an S3 API at ``endpoint`` (None: the one in force where it is used, see
    :func:`resolve_endpoint`), with boto3's standard credentials chain. Each call rides out an
    outage (:func:`call`); a write is one PUT (a managed upload for files)."""

    endpoint: str | None = None
    scheme = "s3"

    @property
    def client(self) -> Any:
        """This process's cached boto3 client for the endpoint."""
        return s3_client(self.endpoint)

    def read_bytes(self, uri: str) -> bytes:
        loc, client = parse(uri), self.client
        try:
            return call(
                uri, lambda: client.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()
            )
        except Exception as exc:
            raise _error(uri, exc) from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        loc, client = parse(uri), self.client
        try:
            call(uri, lambda: client.put_object(Bucket=loc.bucket, Key=loc.path, Body=data))
        except Exception as exc:
            raise _write_error(uri, exc) from exc

    def write_file(self, uri: str, path: str) -> None:
        loc, client = parse(uri), self.client
        try:
            call(uri, lambda: client.upload_file(path, loc.bucket, loc.path))
        except Exception as exc:
            raise _write_error(uri, exc) from exc

    def exists(self, uri: str) -> bool:
        loc, client = parse(uri), self.client
        try:
            call(uri, lambda: client.head_object(Bucket=loc.bucket, Key=loc.path))
            return True
        except Exception as exc:
            if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise _error(uri, exc) from exc
        prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        resp = call(
            uri, lambda: client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
        )
        return resp.get("KeyCount", 0) > 0

    def delete(self, uri: str) -> None:
        loc, client = parse(uri), self.client
        call(uri, lambda: client.delete_object(Bucket=loc.bucket, Key=loc.path))

    def list_files(
        self, uri: str, *, suffixes: Iterable[str] | str | None = None, pattern: str | None = None
    ) -> list[str]:
        loc = parse(uri)
        try:
            found = call(uri, lambda: list(self._walk(loc.bucket, loc.path)))
        except Exception as exc:
            raise _error(uri, exc) from exc
        return listed(loc.uri, found, suffix_tuple(suffixes), pattern)

    def _walk(self, bucket: str, key: str) -> Iterable[str]:
        prefix = key.rstrip("/") + "/" if key else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"

    def make_bucket(self, uri: str) -> None:
        """Create the bucket when the endpoint says it does not exist; one that exists but is
        not ours (403) is left alone: the write that follows will say so."""
        bucket, client = parse(uri).bucket, self.client
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                client.create_bucket(Bucket=bucket)

    def arrow(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """pyarrow's S3 filesystem with boto3's resolved credentials, so both agree on who
        they are."""
        loc = parse(uri)
        return s3_filesystem(self.endpoint), f"{loc.bucket}/{loc.path}".rstrip("/")
