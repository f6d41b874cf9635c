"""The outputs of a bulk job as sinks, in the lifecycle of Ray Data's ``Datasink``.

On the driver a sink hears :meth:`Sink.on_write_start` before the first input is read,
:meth:`Sink.on_rows` each time a block's manifest rows arrive, then :meth:`Sink.on_write_complete`
or :meth:`Sink.on_write_failed`. In the tasks that write (tile blocks, scenes), :meth:`Sink.files`
gives the files of one input's :class:`Output`; :func:`write_files` writes them in the order of
the job's sinks, the mask's last, so once a mask exists so does everything beside it. A new
output of a job is one new sink, added in :func:`job_sinks`.
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
from segray.bulk.outputs import File, LocalFile, Output
from segray.bulk.plan import footprints_uri, uncertainty_uri
from segray.errors import SegrayError
from segray.io import imagery
from segray.io.imagery import Tile

if TYPE_CHECKING:
    from segray.bulk.config import PredictConfig
    from segray.io.files import FileSystem
    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)


@dataclass
class Sink:
    """An output of a bulk job; each hook does nothing unless the sink needs it."""

    #: The manifest column naming its file beside each mask (None: it writes none).
    column: ClassVar[str | None] = None
    #: True when :meth:`files` needs the class ids of each output.
    needs_labels: ClassVar[bool] = False
    #: True when :meth:`files` needs the probability of each pixel's class.
    needs_confidence: ClassVar[bool] = False

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

    def files(self, output: Output) -> list[File]:
        uri, data = uncertainty_uri(output.uri), output.uncertainty
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

    def files(self, output: Output) -> list[File]:
        like = output.like
        doc = inference.footprint_doc(output.class_ids(), like, **self.options)
        return [(footprints_uri(output.uri), json.dumps(doc).encode())]


@dataclass
class VectorSink(Sink):
    """The polygons of each mask as a part beside the masks; at the end the job's one layer,
    merged across seams, from every part (:mod:`segray.bulk.vectors`)."""

    config: PredictConfig
    card: ModelCard
    run_id: str
    needs_labels: ClassVar[bool] = True
    needs_confidence: ClassVar[bool] = True

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
    column: ClassVar[str | None] = "output_uri"

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
    """The sinks of a job's per-input outputs, in writing order: the mask last (the vector
    layer's before the STAC collection, which lists it)."""
    legend = inference.mask_legend(card, config.output_mode, config.class_index)
    sinks: list[Sink] = []
    if config.mc_samples:
        sinks.append(UncertaintySink())
    options = footprint_options(config, card)
    if options is not None:
        sinks.append(FootprintsSink(options))
    if config.vectors:
        sinks.append(VectorSink(config, card, run_id))
    item = catalog.item_options(config, card, legend)
    if item is not None:
        sinks.append(StacItemSink(config, card, item))
    return (*sinks, MaskSink(config, legend))


def legend_of(sinks: Sequence[Sink]) -> dict[str, Any]:
    """The colour table and metadata of the masks the sinks write."""
    return next(s.legend for s in sinks if isinstance(s, MaskSink))


def footprint_options(config: PredictConfig, card: ModelCard) -> dict[str, Any] | None:
    """What the footprints need: the ``footprints`` class, its name, the CRS (None when off)."""
    if config.footprints is None:
        return None
    return {
        "class_index": config.footprints,
        "name": card.names()[config.footprints],
        "to_crs": config.footprints_crs,
    }


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
