"""One way to address data: local paths, ``file://`` URIs and ``s3://bucket/prefix``.

Every path in segray that reads or writes tiles, masks, manifests or checkpoints goes through this
module. Writes are whole-object: a local write goes to a temporary file in the target folder and is
renamed into place; an S3 write is one ``PutObject``. A reader never sees half a file.

The S3 endpoint is chosen, first match wins, from: the ``endpoint`` argument (the CLI's
``--s3-endpoint``), ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; none means AWS itself.
Credentials and region come from the standard AWS chain (environment, config files, instance role).
S3 calls ride out an outage of up to ``SEGRAY_S3_RETRY_S`` seconds (default 60; :mod:`.s3`).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from segray.errors import OutputFull, StorageError
from segray.io import s3
from segray.io.s3 import resolve_endpoint, s3_client, s3_filesystem  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import pyarrow.fs

SCHEMES = ("file", "s3")


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


def local_links(uri: str) -> list[str]:
    """Symbolic links (to files or folders) at or below a local path, sorted; none on S3."""
    loc = parse(uri)
    if loc.scheme != "file":
        return []
    if os.path.islink(loc.path):
        return [loc.path]
    found = []
    for folder, dirs, files in os.walk(loc.path):
        found += [
            os.path.join(folder, n) for n in dirs + files if os.path.islink(os.path.join(folder, n))
        ]
    return sorted(found)


def _s3_error(uri: str, exc: Exception) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return StorageError(f"{uri}: S3 error {code}: {exc}")


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    """Read a whole object or file."""
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read: {exc.strerror or exc}") from exc
    client = s3_client(endpoint)
    try:
        return s3.call(
            uri, lambda: client.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()
        )
    except Exception as exc:
        raise _s3_error(uri, exc) from exc


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write ``data`` as one whole object: temp file + rename locally, one PUT on S3."""
    loc = parse(uri)
    if loc.scheme == "s3":
        try:
            client = s3_client(endpoint)
            s3.call(uri, lambda: client.put_object(Bucket=loc.bucket, Key=loc.path, Body=data))
        except Exception as exc:
            raise _s3_error(uri, exc) from exc
        return
    _write_local(uri, loc.path, lambda f: f.write(data))


def write_file(uri: str, path: str, *, endpoint: str | None = None) -> None:
    """Copy the local file at ``path`` to ``uri`` as one whole object, never read whole into
    memory: temp file + rename locally, boto3's managed (multipart) upload on S3."""
    loc = parse(uri)
    if loc.scheme == "s3":
        try:
            client = s3_client(endpoint)
            s3.call(uri, lambda: client.upload_file(path, loc.bucket, loc.path))
        except Exception as exc:
            raise _s3_error(uri, exc) from exc
        return

    def fill(f: Any) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    _write_local(uri, loc.path, fill)


def _write_local(uri: str, target: str, fill: Callable[[Any], Any]) -> None:
    """``fill`` a temporary file beside ``target``, then rename it into place."""
    folder = os.path.dirname(target) or "."
    tmp = ""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(target)
        )
        # mkstemp makes the file 0600 whatever the umask: give it the mode a plain open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise OutputFull(f"{uri}: cannot write: {exc.strerror}") from exc
        raise


#: errnos after which no further write to the same output can succeed.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Name prefix of the temporary files of local writes (never listed as inputs or outputs).
TEMP_PREFIX = ".tmp-"


def remove_stale_temps(uri: str, older_than: float) -> int:
    """Remove the temporary files of local writes under ``uri`` last touched before
    ``older_than`` (a ``time.time()``): what a killed writer left. Returns how many; S3 has
    none (its writes are one PUT)."""
    loc = parse(uri)
    if loc.scheme != "file" or not os.path.isdir(loc.path):
        return 0
    removed = 0
    for path in _walk_local(loc.path):
        if os.path.basename(path).startswith(TEMP_PREFIX):
            try:
                if os.lstat(path).st_mtime < older_than:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:  # its writer finished or cleaned it meanwhile
                pass
    return removed


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it
    once (cached, so threads writing at once never see the momentary 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(uri: str, text: str, *, endpoint: str | None = None) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode("utf-8"), endpoint=endpoint)


def read_text(uri: str, *, endpoint: str | None = None) -> str:
    """Read a UTF-8 text file or object."""
    return read_bytes(uri, endpoint=endpoint).decode("utf-8")


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """True when the file or object exists (an S3 prefix with objects under it counts too)."""
    loc = parse(uri)
    if loc.scheme == "file":
        return os.path.exists(loc.path)
    client = s3_client(endpoint)
    try:
        s3.call(uri, lambda: client.head_object(Bucket=loc.bucket, Key=loc.path))
        return True
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchKey", "NotFound"):
            raise _s3_error(uri, exc) from exc
    prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    resp = s3.call(uri, lambda: client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1))
    return resp.get("KeyCount", 0) > 0


def delete(uri: str, *, endpoint: str | None = None) -> None:
    """Delete one file or object; a missing one is not an error."""
    loc = parse(uri)
    if loc.scheme == "file":
        if os.path.exists(loc.path):
            os.unlink(loc.path)
        return
    client = s3_client(endpoint)
    s3.call(uri, lambda: client.delete_object(Bucket=loc.bucket, Key=loc.path))


def _matches(rel: str, suffixes: tuple[str, ...], pattern: str | None) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(TEMP_PREFIX):
        return False
    if suffixes and not name.lower().endswith(suffixes):
        return False
    if pattern and not (fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(name, pattern)):
        return False
    return True


def _walk_local(root: str) -> Iterable[str]:
    if os.path.isfile(root):
        yield root
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            yield os.path.join(folder, name)


def _walk_s3(loc: Location, endpoint: str | None) -> Iterable[str]:
    prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    paginator = s3_client(endpoint).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield f"s3://{loc.bucket}/{obj['Key']}"


def list_files(
    uri: str,
    *,
    suffixes: Iterable[str] | str | None = None,
    pattern: str | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """List files under a folder or prefix, recursively, sorted.

    ``suffixes`` keeps names ending in one of them (case-insensitive, e.g. ``(".tif", ".tiff")``);
    ``pattern`` is a glob matched against the path relative to ``uri`` or the file name.
    Returns local absolute paths or ``s3://`` URIs.
    """
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    sfx = tuple(s.lower() for s in suffixes or ())
    loc = parse(uri)
    try:
        if loc.scheme == "s3":
            found = s3.call(uri, lambda: list(_walk_s3(loc, endpoint)))
        else:
            found = list(_walk_local(loc.path))
    except StorageError:
        raise
    except Exception as exc:
        raise _s3_error(uri, exc) from exc
    base = loc.uri
    keep = [u for u in found if _matches(_rel_or_name(base, u), sfx, pattern)]
    return sorted(keep)


def _rel_or_name(base: str, uri: str) -> str:
    try:
        return relative_to(base, uri) or uri.rsplit("/", 1)[-1]
    except StorageError:
        return uri.rsplit("/", 1)[-1]


def make_bucket(uri: str, *, endpoint: str | None = None) -> None:
    """Create the bucket of an ``s3://`` URI when the endpoint says it does not exist.

    A bucket that exists but is not ours (403) is left alone: the write that follows will say so.
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        return
    client = s3_client(endpoint)
    try:
        client.head_bucket(Bucket=loc.bucket)
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            client.create_bucket(Bucket=loc.bucket)


def pyarrow_filesystem(
    uri: str, *, endpoint: str | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Ray Data's ``filesystem=`` arguments.

    S3 credentials are resolved once by boto3's standard chain and handed to pyarrow, so boto3 and
    pyarrow always agree on who they are.
    """
    import pyarrow.fs as pafs

    loc = parse(uri)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    return s3_filesystem(endpoint), f"{loc.bucket}/{loc.path}".rstrip("/")
