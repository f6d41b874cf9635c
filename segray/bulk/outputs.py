"""What one input's result is as a bulk job's sinks see it, in a module of its own so that the
sinks and the domains they write (the vector layer, STAC items) take it without importing each
other: the :class:`Output` of one input, a :data:`File` to write (bytes, or a
:class:`LocalFile` copied whole), and the names of the files made beside a mask."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segray.io.imagery import Tile


@dataclass(frozen=True)
class LocalFile:
    """A file on this machine's disk, copied whole to its URI (a scene's rasters)."""

    path: str


#: One file to write: its URI and its bytes, or the local file to copy there.
File = tuple[str, "bytes | LocalFile"]


@dataclass
class Output:
    """What the sinks see of one input's result in the task that writes it."""

    #: The mask's URI; every other file is named after it.
    uri: str
    input_uri: str
    #: An empty tile with the input's format and georeference (for encoders).
    like: Tile
    shape: tuple[int, int]
    #: The rendered mask, or its local file.
    mask: np.ndarray | LocalFile
    uncertainty: np.ndarray | LocalFile | None = None
    #: Class ids of the mask's pixels (for vectors), or what reads them when asked.
    labels: np.ndarray | Callable[[], np.ndarray] | None = None
    #: The probability of each pixel's class, uint8 0..254 (for the vector layer's scores).
    confidence: np.ndarray | Callable[[], np.ndarray] | None = None
    #: The STAC item the input comes from (``href``, ``id``, ``datetime``), if any.
    source: dict[str, str] | None = None

    def class_ids(self) -> np.ndarray:
        """The class ids, read now where they are on disk."""
        if self.labels is None:
            raise ValueError(f"{self.uri}: no class ids were kept for this output")
        return self.labels() if callable(self.labels) else self.labels

    def confidence_map(self) -> np.ndarray | None:
        """The class probabilities, read now where they are on disk (None: not kept)."""
        return self.confidence() if callable(self.confidence) else self.confidence


def uncertainty_uri(mask: str) -> str:
    """The uncertainty map beside a mask: ``x.tif`` → ``x.uncertainty.tif``."""
    stem, ext = os.path.splitext(mask)
    return f"{stem}.uncertainty{ext}"


def footprints_uri(mask: str) -> str:
    """The footprints beside a mask: ``x.tif`` → ``x.geojson``."""
    return os.path.splitext(mask)[0] + ".geojson"


def item_uri(mask: str) -> str:
    """The STAC item beside a mask: ``x.tif`` → ``x.json``."""
    return os.path.splitext(mask)[0] + ".json"
