"""segray's own errors: one base, and kinds that callers map to an outcome by type, never by text.

Every error segray raises on purpose about the user's input, settings or data is a
:class:`SegrayError`: the CLI prints its message as one line, Serve picks its HTTP status from a
:class:`TileError`'s ``kind``, a bulk job turns it into an error row. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Why a tile (an image, a mask or a label file) cannot be used.
TileErrorKind = Literal[
    "empty",  # no bytes, or no pixels
    "not_image",  # bytes of no supported image format
    "corrupt",  # a known format, but truncated or damaged
    "too_large",  # more pixels than the limit
    "pixel_type",  # a pixel type or image mode segray does not read, or the model does not take
    "bands",  # a band count or band selection that does not fit
    "unreadable",  # storage could not deliver the bytes
    "labels",  # labels that do not fit their image or the classes
]
TILE_ERROR_KINDS: tuple[str, ...] = get_args(TileErrorKind)


class SegrayError(Exception):
    """Base of every error segray raises about input, settings or data; its message says what
    to do. The CLI prints it as one line; anything that is not a SegrayError is a bug."""


class ConfigError(SegrayError, ValueError):
    """A setting refused: the message names the field, the value and what is allowed."""


class StorageError(SegrayError, OSError):
    """A URI that cannot be read, written or listed; the message names the URI."""


class OutputFull(StorageError):
    """The output cannot take another write (disk full, quota, read-only file system): every
    write after it would fail the same way, so a job stops and says what it did."""


class ModelError(SegrayError, ValueError):
    """A model that cannot be built, loaded or used as asked; the message says what is allowed."""


class DatasetError(SegrayError, ValueError):
    """A labelled collection that cannot be used; the message names the files and what to do."""


class TileError(SegrayError, ValueError):
    """A tile that cannot be used; ``str(err)`` is ``"<source>: <reason>"`` and ``kind`` says
    why, for callers that map it (Serve's status code)."""

    def __init__(self, source: str, reason: str, kind: TileErrorKind = "corrupt") -> None:
        if kind not in TILE_ERROR_KINDS:
            raise ValueError(f"kind must be one of {TILE_ERROR_KINDS}; got {kind!r}")
        super().__init__(f"{source}: {reason}")
        self.source, self.reason, self.kind = source, reason, kind

    def __reduce__(self) -> tuple:
        # Ray ships exceptions between processes by pickling: keep the three fields.
        return (type(self), (self.source, self.reason, self.kind))
