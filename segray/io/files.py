"""How segray names data and what a place that holds it promises.

A URI is a local path, a ``file://`` URI or ``s3://bucket/key``; the functions here only read
and compose URIs, they never touch storage. :class:`FileSystem` is the contract of the places
that hold data (:class:`~segray.io.local.LocalFileSystem`,
:class:`~segray.io.s3.S3FileSystem`): chosen once for a URI by
:func:`segray.io.storage.filesystem`, bound to its endpoint and credentials chain, and passed
along instead of an endpoint. Every write is whole: a reader never sees half a file.
"""

from __future__ import annotations

import functools
import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from segray.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs

SCHEMES = ("file", "s3")
#: Name prefix of the temporary files of local writes (never listed as inputs or outputs).
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``file`` or ``s3``; ``path`` is absolute (file) or a key (s3)."""

    scheme: str
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        """The canonical URI: an absolute local path, or ``s3://bucket/key``."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path


def parse(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/key`` into a :class:`Location`.

    An S3 key is everything after the bucket: ``?`` and ``#`` are characters of keys, not a
    query or fragment."""
    if uri.startswith(("s3://", "/")):  # their meaning depends on nothing else: cached
        return _parse_fixed(uri)
    return _parse(uri)


@functools.lru_cache(maxsize=4096)  # a job parses its input and output bases once per tile
def _parse_fixed(uri: str) -> Location:
    return _parse(uri)


def _parse(uri: str) -> Location:
    if not uri:
        raise StorageError("empty URI: give a local path, file:// or s3://bucket/prefix")
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return Location("s3", bucket, key.lstrip("/"))
    if uri.startswith("file://"):
        return Location("file", "", os.path.abspath(urlparse(uri).path))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use one of {SCHEMES} or a path")
    return Location("file", "", os.path.abspath(os.path.expanduser(uri)))


def is_s3(uri: str) -> bool:
    """True when ``uri`` addresses an S3 object or prefix."""
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (S3) or the OS separator (local)."""
    parts = tuple(p.strip("/") for p in parts if p)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(parse(base).path, *parts)


def relative_to(base: str, uri: str) -> str:
    """The path of ``uri`` below ``base``, with ``/`` separators (``images/a.png``)."""
    b, u = parse(base), parse(uri)
    if b.scheme != u.scheme or b.bucket != u.bucket:
        raise StorageError(f"{uri} is not under {base}")
    prefix = b.path.rstrip("/")
    if prefix and not (u.path == prefix or u.path.startswith(prefix + "/")):
        raise StorageError(f"{uri} is not under {base}")
    rel = u.path[len(prefix) :].lstrip("/")
    return rel.replace(os.sep, "/")


def lies_under(base: str, uri: str) -> bool:
    """True when ``uri`` lies below ``base`` once ``.`` and ``..`` are resolved (same bucket on S3).

    A key such as ``masks/../../x.tif`` or a relative path that climbs out does not."""
    b, u = parse(base), parse(uri)
    if b.scheme != u.scheme or b.bucket != u.bucket:
        return False
    norm = posixpath.normpath if b.scheme == "s3" else os.path.normpath
    prefix, path = norm("/" + b.path).rstrip("/"), norm("/" + u.path)
    return path.startswith(prefix + "/")


def listed(base: str, found: Iterable[str], suffixes: tuple[str, ...], pattern: str | None) -> list:
    """The URIs of ``found`` (under ``base``) that a listing keeps, sorted: never a temporary
    file; names ending in one of ``suffixes`` (lower case) when given; matching the glob
    ``pattern`` on the relative path or the name when given."""
    import fnmatch

    def keep(uri: str) -> bool:
        rel = _rel_or_name(base, uri)
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX) or (suffixes and not name.lower().endswith(suffixes)):
            return False
        return not pattern or fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(name, pattern)

    return sorted(u for u in found if keep(u))


def _rel_or_name(base: str, uri: str) -> str:
    try:
        return relative_to(base, uri) or uri.rsplit("/", 1)[-1]
    except StorageError:
        return uri.rsplit("/", 1)[-1]


class FileSystem(ABC):
    """A place that holds data, bound to its endpoint and credentials: every URI given to one of
    its methods has its scheme. Writes are whole (temp + rename locally, one PUT on S3); a
    missing file is a :class:`~segray.errors.StorageError` naming it."""

    scheme: str = ""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """A whole object or file."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` as one whole object."""

    @abstractmethod
    def write_file(self, uri: str, path: str) -> None:
        """Copy the local file at ``path`` to ``uri`` whole, never read into memory at once."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """True when the file or object exists (a folder or prefix with files under it too)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete one file or object; a missing one is not an error."""

    @abstractmethod
    def list_files(
        self, uri: str, *, suffixes: Iterable[str] | str | None = None, pattern: str | None = None
    ) -> list[str]:
        """Files under a folder or prefix (or the one file), recursively, sorted; ``suffixes``
        keeps names ending in one of them (any case), ``pattern`` is a glob on the path
        relative to ``uri`` or the name."""

    @abstractmethod
    def arrow(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem with the same endpoint and credentials, and the path inside it
        (for Ray Data, Ray Train and GDAL's ranged reads)."""

    def make_bucket(self, uri: str) -> None:
        """Create the bucket of ``uri`` where the scheme has buckets and it is missing."""
        return None

    def remove_stale_temps(self, uri: str, older_than: float) -> int:
        """Remove what killed writers left under ``uri`` before ``older_than`` (a
        ``time.time()``); returns how many. None where writes are one PUT."""
        return 0

    def remove_orphaned_temps(self, uri: str) -> int:
        """Remove temporary files under ``uri`` whose writer is known to be dead (a process of
        this host that is gone); returns how many. None where writes are one PUT."""
        return 0

    def links(self, uri: str) -> list[str]:
        """Symbolic links at or below ``uri``, sorted (none where there are no links)."""
        return []

    def not_files(self, uris: Iterable[str]) -> dict[str, str]:
        """Those of ``uris`` that are no regular file, with what they are (a named pipe, a
        socket, a device, a folder), from their metadata alone: reading one could block for
        ever or never end. None where every object is a file."""
        return {}

    def read_text(self, uri: str) -> str:
        """A UTF-8 text file or object."""
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        """Write UTF-8 text whole (see :meth:`write_bytes`)."""
        self.write_bytes(uri, text.encode("utf-8"))


def suffix_tuple(suffixes: Iterable[str] | str | None) -> tuple[str, ...]:
    """``suffixes`` as a tuple of lower-case suffixes (one string is one suffix)."""
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    return tuple(s.lower() for s in suffixes or ())
