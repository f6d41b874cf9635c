"""The front door to where data lives: :func:`filesystem` chooses, once per URI, the
:class:`~segray.io.files.FileSystem` that holds it (local folders or S3), bound to its endpoint
and credentials chain; the library passes that object along, never an endpoint.

The S3 endpoint is chosen, first match wins, from: the ``endpoint`` argument (the CLI's
``--s3-endpoint``), ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; none means AWS itself.
Credentials and region come from the standard AWS chain (environment, config files, instance role).
S3 calls ride out an outage of up to ``SEGRAY_S3_RETRY_S`` seconds (default 60; :mod:`.s3`).

The URI functions of :mod:`.files` are here too, and a one-call form of each FileSystem method
(``storage.read_bytes(uri, endpoint=...)``) for scripts, notebooks and tests that touch one
object; the library itself holds a FileSystem.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from segray.errors import StorageError  # noqa: F401 (what every storage failure raises)
from segray.io.files import (  # noqa: F401 (the URI functions, re-exported)
    SCHEMES,
    TEMP_PREFIX,
    FileSystem,
    Location,
    is_s3,
    join,
    lies_under,
    parse,
    relative_to,
)
from segray.io.local import LocalFileSystem
from segray.io.s3 import S3FileSystem, resolve_endpoint, s3_client, s3_filesystem  # noqa: F401

if TYPE_CHECKING:
    import pyarrow.fs

LOCAL = LocalFileSystem()


def filesystem(uri: str, endpoint: str | None = None) -> FileSystem:
    """The FileSystem that holds ``uri``; ``endpoint`` is the S3 endpoint (None: the one in
    force in the process that uses it). Raises a StorageError for an unknown scheme."""
    if is_s3(uri):
        return _s3(endpoint)
    parse(uri)  # refuses what is neither a path nor a known scheme
    return LOCAL


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None) -> S3FileSystem:
    return S3FileSystem(endpoint)


class Addressed:
    """For configs with an ``endpoint`` setting: :meth:`fs` gives the FileSystem of a URI."""

    def fs(self, uri: str) -> FileSystem:
        """The FileSystem holding ``uri``, with this config's S3 endpoint."""
        return filesystem(uri, self.endpoint)  # type: ignore[attr-defined]


# --- one call, one object: for scripts and tests ------------------------------------------------


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    """Read a whole object or file."""
    return filesystem(uri, endpoint).read_bytes(uri)


def read_text(uri: str, *, endpoint: str | None = None) -> str:
    """Read a UTF-8 text file or object."""
    return filesystem(uri, endpoint).read_text(uri)


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write ``data`` as one whole object: temp file + rename locally, one PUT on S3."""
    filesystem(uri, endpoint).write_bytes(uri, data)


def write_text(uri: str, text: str, *, endpoint: str | None = None) -> None:
    """Write UTF-8 text whole."""
    filesystem(uri, endpoint).write_text(uri, text)


def write_file(uri: str, path: str, *, endpoint: str | None = None) -> None:
    """Copy the local file at ``path`` to ``uri`` whole."""
    filesystem(uri, endpoint).write_file(uri, path)


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """True when the file or object exists (an S3 prefix with objects under it counts too)."""
    return filesystem(uri, endpoint).exists(uri)


def delete(uri: str, *, endpoint: str | None = None) -> None:
    """Delete one file or object; a missing one is not an error."""
    filesystem(uri, endpoint).delete(uri)


def list_files(
    uri: str,
    *,
    suffixes: Iterable[str] | str | None = None,
    pattern: str | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """Files under a folder or prefix, recursively, sorted (see FileSystem.list_files)."""
    return filesystem(uri, endpoint).list_files(uri, suffixes=suffixes, pattern=pattern)


def make_bucket(uri: str, *, endpoint: str | None = None) -> None:
    """Create the bucket of an ``s3://`` URI when the endpoint says it does not exist."""
    filesystem(uri, endpoint).make_bucket(uri)


def pyarrow_filesystem(
    uri: str, *, endpoint: str | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Ray Data's ``filesystem=`` arguments."""
    return filesystem(uri, endpoint).arrow(uri)
