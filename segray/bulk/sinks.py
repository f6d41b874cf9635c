"""The outputs of a bulk job as sinks, in the lifecycle of Ray Data's ``Datasink``.

On the driver a sink hears :meth:`Sink.on_write_start` before the first input is read,
:meth:`Sink.on_rows` each time a block's manifest rows arrive, then :meth:`Sink.on_write_complete`
or :meth:`Sink.on_write_failed`. In the tasks that write (tile blocks, scenes), :meth:`Sink.files`
gives the files of one input's :class:`Output`; :func:`write_files` writes them in the order of
the job's sinks, the mask's last, so once a mask exists so does everything beside it.

A new output of a job is one new sink class and nothing else: defining it registers it
(:attr:`Sink.kinds`, in writing order), :meth:`Sink.made` says which jobs make it and
:meth:`Sink.build` makes it for one; a sink that writes one file beside each mask names its
manifest ``column`` and :meth:`Sink.beside`, and the manifest's columns, the plan's outputs (what
a rerun skips) and the rows of every bulk stage follow (:func:`file_columns`, :func:`outputs`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from segray import inference
from segray.bulk import catalog
from segray.bulk.outputs import File, LocalFile, Output, footprints_uri, item_uri, uncertainty_uri
from segray.errors import SegrayError
from segray.io import imagery
from segray.io.imagery import Tile

if TYPE_CHECKING:
    from segray.bulk.config import PredictConfig
    from segray.io.files import FileSystem
    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)
#: The manifest column of the mask itself.
MASK_COLUMN = "output_uri"


@dataclass
class Sink:
    """An output of a bulk job; each hook does nothing unless the sink needs it."""

    #: The manifest column naming its file beside each mask (None: it writes none).
    column: ClassVar[str | None] = None
    #: True when :meth:`files` needs the class ids of each output.
    needs_labels: ClassVar[bool] = False
    #: True when :meth:`files` needs the probability of each pixel's class.
    needs_confidence: ClassVar[bool] = False
    #: Every kind of sink, in writing order as defined (the mask's kind is written last).
    kinds: ClassVar[list[type[Sink]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Sink.kinds.append(cls)

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        """Whether a job of ``config`` makes this output (known before the model is read)."""
        return False

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        """This sink for one job that :meth:`made` it."""
        raise NotImplementedError(f"{cls.__name__} is not built by job_sinks")

    @staticmethod
    def beside(mask: str) -> str:
        """The URI of its file beside the mask at ``mask`` (sinks with a ``column``)."""
        raise NotImplementedError

    def on_write_start(self) -> None:
        """On the driver, before the first input is read."""

    def files(self, output: Output) -> list[File]:
        """In a task: the files of one input (none by default)."""
        return []

    def on_rows(self, rows: dict[str, np.ndarray]) -> None:
        """On the driver: the manifest rows of a block that has been written."""

    def on_write_complete(self, masks: list[str]) -> None:
        """On the driver, after the last input: ``masks`` are every mask of the job (those of
        earlier runs it skipped too)."""

    def on_write_failed(self, reason: str) -> None:
        """On the driver, when the job stopped early (``reason``): what was written stays."""


@dataclass
class UncertaintySink(Sink):
    """``x.uncertainty.<ext>`` beside each mask (Monte-Carlo dropout entropy)."""

    column: ClassVar[str | None] = "uncertainty_uri"
    beside = staticmethod(uncertainty_uri)

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        return bool(config.mc_samples)

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        return cls()

    def files(self, output: Output) -> list[File]:
        uri, data = self.beside(output.uri), output.uncertainty
        if data is None:
            raise ValueError(f"{output.uri}: no uncertainty was computed")
        if isinstance(data, LocalFile):
            return [(uri, data)]
        return [(uri, encode_like(data, output.like, uri, {"tags": inference.UNCERTAINTY_TAGS}))]


@dataclass
class FootprintsSink(Sink):
    """``x.geojson`` beside each mask: the polygons of one class (see :func:`footprint_options`)."""

    options: dict[str, Any]
    column: ClassVar[str | None] = "footprints_uri"
    needs_labels: ClassVar[bool] = True
    beside = staticmethod(footprints_uri)

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        return config.footprints is not None

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        options = {
            "class_index": config.footprints,
            "name": card.names()[config.footprints],
            "to_crs": config.footprints_crs,
        }
        return cls(options)

    def files(self, output: Output) -> list[File]:
        like = output.like
        doc = inference.footprint_doc(output.class_ids(), like, **self.options)
        return [(self.beside(output.uri), json.dumps(doc).encode())]


@dataclass
class VectorSink(Sink):
    """The polygons of each mask as a part beside the masks; at the end the job's one layer,
    merged across seams, from every part (:mod:`segray.bulk.vectors`)."""

    config: PredictConfig
    card: ModelCard
    run_id: str
    needs_labels: ClassVar[bool] = True
    needs_confidence: ClassVar[bool] = True

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        return bool(config.vectors)

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        return cls(config, card, run_id)

    def classes(self) -> list[int]:
        """The classes asked, by default every class but the background (0)."""
        asked = self.config.vector_classes
        return list(asked) if asked else list(range(1, self.card.num_classes))

    def files(self, output: Output) -> list[File]:
        from segray.bulk import vectors

        data = vectors.part_bytes(self.config, output, self.classes(), self.run_id)
        return [(vectors.part_uri(self.config, output.uri), data)]

    def on_write_complete(self, masks: list[str]) -> None:
        from segray.bulk import vectors

        if not masks:
            return
        try:
            vectors.build_layer(self.config, self.card, sorted(set(masks)), self.run_id)
        except SegrayError as exc:
            log.error("vector layer not written: %s", exc)


@dataclass
class StacItemSink(Sink):
    """The STAC item ``x.json`` beside each mask, and at the end ``collection.json`` over every
    mask of the job (a failure to write it is logged: the masks and items are there)."""

    config: PredictConfig
    card: ModelCard
    options: dict[str, Any]
    column: ClassVar[str | None] = "item_uri"
    beside = staticmethod(item_uri)

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        return bool(config.stac_items)

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        options = catalog.item_options(config, card, legend(config, card))
        assert options is not None  # made: stac_items is on
        return cls(config, card, options)

    def files(self, output: Output) -> list[File]:
        like = output.like
        item = (like.crs, like.transform, output.shape, output.input_uri, output.source)
        return [catalog.item_file(output.uri, *item, self.options)]

    def on_write_complete(self, masks: list[str]) -> None:
        try:
            uri = catalog.write_collection(self.config, self.card, masks, self.config.io_threads)
        except SegrayError as exc:
            log.error("STAC collection not written: %s", exc)
            return
        if uri:
            log.info("STAC collection of %d mask(s): %s", len(set(masks)), uri)


@dataclass
class MaskSink(Sink):
    """The mask itself, encoded like its input (GeoTIFF/COG for TIFF inputs, else PNG) with the
    job's colour table; it goes last. What killed writers left is swept at the start (temporary
    files older than a minute) and, at the start and the end, every one whose writer is a process
    of this host that is gone (the name of a temporary file says which)."""

    config: PredictConfig
    legend: dict[str, Any] = field(default_factory=dict)
    column: ClassVar[str | None] = MASK_COLUMN

    @classmethod
    def made(cls, config: PredictConfig) -> bool:
        return True

    @classmethod
    def build(cls, config: PredictConfig, card: ModelCard, run_id: str) -> Sink:
        return cls(config, legend(config, card))

    @staticmethod
    def beside(mask: str) -> str:
        return mask

    def on_write_start(self) -> None:
        import time

        out, fs = self.config.output, self.config.fs(self.config.output)
        stale = fs.remove_stale_temps(out, time.time() - STALE_TEMP_S)
        stale += fs.remove_orphaned_temps(out)
        if stale:
            log.info("removed %d temporary file(s) a killed writer left in %s", stale, out)

    def on_write_complete(self, masks: list[str]) -> None:
        out = self.config.output
        orphaned = self.config.fs(out).remove_orphaned_temps(out)
        if orphaned:
            log.info("removed %d temporary file(s) of writers lost during the job", orphaned)

    def files(self, output: Output) -> list[File]:
        if isinstance(output.mask, LocalFile):
            return [(output.uri, output.mask)]
        return [(output.uri, encode_like(output.mask, output.like, output.uri, self.legend))]


#: Temporary files older than this when a job starts are a killed writer's (a live write takes
#: seconds): removed.
STALE_TEMP_S = 60.0


def job_sinks(config: PredictConfig, card: ModelCard, run_id: str = "") -> tuple[Sink, ...]:
    """The sinks of a job's per-input outputs, in writing order: every kind the job makes, the
    mask last (the vector layer's before the STAC collection, which lists it)."""
    kinds = sorted((k for k in Sink.kinds if k.made(config)), key=lambda k: k is MaskSink)
    return tuple(kind.build(config, card, run_id) for kind in kinds)


def file_columns() -> tuple[str, ...]:
    """The manifest's columns of files, one for each kind of sink that writes one beside each
    mask: the mask's own (``output_uri``) first."""
    named = [k.column for k in Sink.kinds if k.column and k is not MaskSink]
    return (MASK_COLUMN, *dict.fromkeys(named))


def outputs(mask: str, config: PredictConfig) -> dict[str, str | None]:
    """Every file a job makes for one input, by manifest column: the mask, and the file beside
    it of every sink the job makes; None where it makes no such file."""
    made = {k.column: k for k in Sink.kinds if k.column and k.made(config)}
    return {c: made[c].beside(mask) if c in made else None for c in file_columns()}


def legend(config: PredictConfig, card: ModelCard) -> dict[str, Any]:
    """The colour table and metadata of a job's masks."""
    return inference.mask_legend(card, config.output_mode, config.class_index)


def legend_of(sinks: Sequence[Sink]) -> dict[str, Any]:
    """The colour table and metadata of the masks the sinks write."""
    return next(s.legend for s in sinks if isinstance(s, MaskSink))


def files_of(sinks: Sequence[Sink], output: Output) -> tuple[list[File], dict[str, str]]:
    """The files of one output in writing order (the mask last), and its manifest URIs."""
    files: list[File] = []
    uris: dict[str, str] = {}
    for sink in sinks:
        made = sink.files(output)
        files += made
        if sink.column and made:
            uris[sink.column] = made[0][0]
    return files, uris


def write_files(fs: FileSystem, files: Sequence[File]) -> None:
    """Write each file whole, in order."""
    for uri, data in files:
        if isinstance(data, LocalFile):
            fs.write_file(uri, data.path)
        else:
            fs.write_bytes(uri, data)


def encode_like(
    mask: np.ndarray, like: Tile, uri: str, legend: dict[str, Any] | None = None
) -> bytes:
    """Mask bytes in the format its URI names: ``.tif`` a GeoTIFF with ``like``'s georeference;
    ``legend`` (:func:`segray.inference.mask_legend`) gives its colour table and metadata."""
    data, ext = imagery.encode_mask(mask, like=like, **(legend or {}))
    if uri.endswith(ext):
        return data
    if uri.endswith(".tif"):  # a TIFF name holding another format: keep the name's promise
        return imagery.encode_geotiff(
            imagery.as_mask(mask), like.crs, like.transform, nodata=imagery.MASK_NODATA
        )
    return imagery.encode_png(imagery.as_mask(mask))
