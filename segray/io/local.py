"""Local folders as a :class:`~segray.io.files.FileSystem`: a write goes to a temporary file
beside its target, with the mode the umask gives, and is renamed into place."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segray.errors import OutputFull, StorageError
from segray.io.files import TEMP_PREFIX, FileSystem, listed, parse, suffix_tuple

if TYPE_CHECKING:
    import pyarrow.fs

#: errnos after which no further write to the same output can succeed.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass(frozen=True)
class LocalFileSystem(FileSystem):
    """This machine's files (local paths and ``file://`` URIs)."""

    scheme = "file"

    def read_bytes(self, uri: str) -> bytes:
        try:  # opened without blocking: a named pipe with no writer would wait for ever
            fd = os.open(parse(uri).path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "rb") as f:
            kind = _kind(os.fstat(fd).st_mode)
            if kind:
                raise StorageError(f"{uri}: cannot read: {kind}, not a regular file")
            os.set_blocking(fd, True)
            try:
                return f.read()
            except OSError as exc:
                raise StorageError(f"{uri}: cannot read: {exc.strerror or exc}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        _write_local(uri, parse(uri).path, lambda f: f.write(data))

    def write_file(self, uri: str, path: str) -> None:
        def fill(f: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        _write_local(uri, parse(uri).path, fill)

    def exists(self, uri: str) -> bool:
        return os.path.exists(parse(uri).path)

    def delete(self, uri: str) -> None:
        path = parse(uri).path
        if os.path.exists(path):
            os.unlink(path)

    def list_files(
        self, uri: str, *, suffixes: Iterable[str] | str | None = None, pattern: str | None = None
    ) -> list[str]:
        loc = parse(uri)
        return listed(loc.uri, _walk(loc.path), suffix_tuple(suffixes), pattern)

    def arrow(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), parse(uri).path

    def remove_stale_temps(self, uri: str, older_than: float) -> int:
        root = parse(uri).path
        if not os.path.isdir(root):
            return 0
        removed = 0
        for path in _walk(root):
            if os.path.basename(path).startswith(TEMP_PREFIX):
                try:
                    if os.lstat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:  # its writer finished or cleaned it meanwhile
                    pass
        return removed

    def remove_orphaned_temps(self, uri: str) -> int:
        root = parse(uri).path
        if not os.path.isdir(root):
            return 0
        removed = 0
        for path in _walk(root):
            name = os.path.basename(path)
            if name.startswith(TEMP_PREFIX) and _writer_gone(name):
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def not_files(self, uris: Iterable[str]) -> dict[str, str]:
        found = {}
        for uri in uris:
            try:
                kind = _kind(os.stat(parse(uri).path).st_mode)
            except OSError:  # missing: its read says so
                continue
            if kind:
                found[uri] = kind
        return found

    def links(self, uri: str) -> list[str]:
        root = parse(uri).path
        if os.path.islink(root):
            return [root]
        found = []
        for folder, dirs, files in os.walk(root):
            found += [
                os.path.join(folder, n)
                for n in dirs + files
                if os.path.islink(os.path.join(folder, n))
            ]
        return sorted(found)


def _kind(mode: int) -> str:
    """What a file of ``mode`` is when it is no regular file ("" when it is one)."""
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "")


def _walk(root: str) -> Iterable[str]:
    if os.path.isfile(root):
        yield root
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            yield os.path.join(folder, name)


def _write_local(uri: str, target: str, fill: Callable[[Any], Any]) -> None:
    """``fill`` a temporary file beside ``target``, then rename it into place."""
    folder = os.path.dirname(target) or "."
    tmp = ""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=f"{TEMP_PREFIX}{_writer()}.", suffix="-" + os.path.basename(target)
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


def _writer() -> str:
    """Who writes a temporary file: this host (a hash of its name) and process id."""
    return f"{_host()}.{os.getpid()}"


@functools.lru_cache(maxsize=1)
def _host() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _writer_gone(name: str) -> bool:
    """True when a temporary file's name says its writer was a process of this host that is no
    longer alive (names of other hosts, or of another form, say nothing: False)."""
    tag = name[len(TEMP_PREFIX) :].split("-", 1)[0].split(".")
    if len(tag) != 3 or tag[0] != _host() or not tag[1].isdigit():
        return False
    try:
        os.kill(int(tag[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
