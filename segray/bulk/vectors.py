"""One vector layer per job (``--vectors``): polygons traced beside each mask, merged across tile
and window seams off the driver, written as one GeoParquet, FlatGeobuf or GeoPackage file.

In the task that writes a mask, ``VectorSink`` (:mod:`.sinks`) traces its polygons into a part,
``<output>/_vectors/parts/<mask path>.parquet``, written before the mask (a mask of an earlier
run has its part: a rerun that skips it reuses it). Each polygon is marked when it touches
its tile's (or scene block's) edge. At the end :func:`build_layer` runs Ray tasks:

1. **scan** a chunk of parts each: polygons inside their tile are final at once (simplified,
   reprojected, their area and score) and written as a staged part; border pieces are staged
   too, and again into the buckets of the grid cells their extent covers;
2. **pair**, a bucket each: within a cell, pieces of one grid and class that share an edge;
   only these ids (integers) come back, and the driver joins them (union-find);
3. **join**, a bucket of joined groups each: the pieces of a group become one polygon, with
   one area and one score (pixel-weighted over its pieces).

The layer is then written part after part to a local file and copied whole to its URI: a job
killed before that leaves no half layer there.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.errors import SegrayError
from segray.io import polygons, storage
from segray.io.vectorlayer import LayerWriter, layer_format, layer_schema

if TYPE_CHECKING:
    import pyarrow as pa

    from segray.bulk.config import PredictConfig
    from segray.bulk.outputs import Output
    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)

VECTORS_DIR = "_vectors"
#: A grid cell of the pairing step is this many pixels a side.
CELL_PIXELS = 2048
#: Parts read by one scan task; parts per bucket of the pair and join steps (at most 32).
PARTS_PER_TASK = 256
PARTS_PER_BUCKET = 500


def part_uri(config: PredictConfig, mask: str) -> str:
    """The vector part of a mask: ``<output>/_vectors/parts/<mask path>.parquet``."""
    relative = storage.relative_to(config.output, mask) or mask.rsplit("/", 1)[-1]
    return storage.join(config.output, VECTORS_DIR, "parts", relative + ".parquet")


def part_bytes(config: PredictConfig, output: Output, classes: list[int], run_id: str) -> bytes:
    """The vector part of one output: its polygons (traced in blocks for a scene), each with
    its grid (CRS, pixel size), source and run, as Parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    like = output.like
    cols = polygons.trace(
        output.class_ids(),
        output.confidence_map(),
        like.transform,
        classes,
        opening=config.opening,
        block=config.vector_block if config.scene else None,
    )
    n = len(cols["wkb"])
    source = (output.source or {}).get("id") or output.input_uri
    table = pa.table(
        {
            **{k: cols[k] for k in polygons.COLUMNS},
            "crs": [like.crs or ""] * n,
            "res": [polygons.pixel_size(like.transform)] * n,
            "source": [source] * n,
            "run_id": [run_id] * n,
        },
        schema=part_schema(),
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def part_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("wkb", pa.binary()),
            ("class_id", pa.int16()),
            ("pixels", pa.int64()),
            ("score_sum", pa.float64()),
            ("border", pa.bool_()),
            ("crs", pa.string()),
            ("res", pa.float64()),
            ("source", pa.string()),
            ("run_id", pa.string()),
        ]
    )


@dataclass(frozen=True)
class LayerJob:
    """What the layer's tasks share: where parts are staged and how polygons are finished."""

    config: PredictConfig
    names: tuple[str, ...]
    model_version: str
    staging: str
    buckets: int
    cell_pixels: int

    def fs(self) -> Any:
        return self.config.fs(self.staging)


def build_layer(config: PredictConfig, card: ModelCard, masks: Sequence[str], run_id: str) -> str:
    """Write the layer of ``masks``' parts to ``config.vectors``; returns its URI."""
    import ray

    from segray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(address=config.ray_address)
    start = time.monotonic()
    parts = [part_uri(config, m) for m in masks]
    staging = storage.join(config.output, VECTORS_DIR, run_id)
    buckets = max(1, min(32, len(parts) // PARTS_PER_BUCKET))
    job = LayerJob(config, tuple(card.names()), card.version, staging, buckets, CELL_PIXELS)
    opts = {"num_cpus": config.cpus_per_task}
    scan = ray.remote(**opts)(scan_parts)
    chunks = [parts[i : i + PARTS_PER_TASK] for i in range(0, len(parts), PARTS_PER_TASK)]
    scanned = ray.get([scan.remote(job, k, chunk) for k, chunk in enumerate(chunks)])
    missing = sum(s["missing"] for s in scanned)
    if missing:
        log.warning(
            "vectors: %d mask(s) have no vector part (made by a run without --vectors): "
            "left out of the layer; rerun with --overwrite to include them",
            missing,
        )
    unreadable = [u for s in scanned for u in s["unreadable"]]
    if unreadable:
        log.error(
            "vectors: %d part(s) unreadable, their polygons left out (rerun with --overwrite to "
            "redo their masks): %s",
            len(unreadable),
            "; ".join(unreadable[:3]),
        )
    crs = layer_crs(config, {c for s in scanned for c in s["crs"]})
    border = [k for k, s in enumerate(scanned) if s["border"]]
    pair = ray.remote(**opts)(pair_bucket)
    edges = ray.get([pair.remote(job, b, border) for b in range(buckets)]) if border else []
    roots = polygons.join_ids(np.concatenate(edges) if edges else np.empty((0, 2), np.int64))
    join = ray.remote(**opts)(join_bucket)
    ids = np.fromiter(roots, np.int64, len(roots))
    order = np.argsort(ids)
    table = ray.put((ids[order], np.fromiter(roots.values(), np.int64, len(roots))[order]))
    joined = ray.get([join.remote(job, b, border, table) for b in range(buckets)])
    staged = [s["interior"] for s in scanned if s["interior"]] + [j for j in joined if j]
    uri, count = write_layer(config, staged, crs)
    log.info(
        "vector layer of %d polygon(s) (%d traced, %d piece(s) on seams): %s (%.1f s)",
        count,
        sum(s["polygons"] for s in scanned),
        sum(s["border"] for s in scanned),
        uri,
        time.monotonic() - start,
    )
    _remove(job)
    return uri


def read_table(fs: Any, uri: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(fs.read_bytes(uri)))


def write_table(fs: Any, uri: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.write_bytes(uri, sink.getvalue())


def scan_parts(job: LayerJob, k: int, parts: list[str]) -> dict[str, Any]:
    """Ray task: a chunk of parts; the polygons inside their tiles finished and staged, the
    border pieces staged whole and by cell bucket. Returns counts and staged URIs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fs, tables, missing, unreadable = job.fs(), [], 0, []
    for uri in parts:
        try:
            tables.append(read_table(fs, uri).cast(part_schema()))
        except SegrayError:
            missing += 1
        except Exception as exc:  # a broken part leaves its polygons out, not the layer
            unreadable.append(f"{uri}: {type(exc).__name__}: {exc}")
    table = pa.concat_tables(tables) if tables else part_schema().empty_table()
    inner = table.filter(pc.invert(table.column("border")))
    outer = table.filter(table.column("border"))
    out: dict[str, Any] = {"missing": missing, "polygons": len(table), "border": len(outer)}
    out["unreadable"] = unreadable
    out["crs"] = set(table.column("crs").unique().to_pylist())
    layer = finished(job, inner.to_pylist())
    out["kept"] = len(layer)
    out["interior"] = None
    if len(layer):
        out["interior"] = storage.join(job.staging, f"interior-{k:05d}.parquet")
        write_table(fs, out["interior"], layer)
    if len(outer):
        ids = (np.int64(k) << 32) + np.arange(len(outer), dtype=np.int64)
        outer = outer.append_column("id", pa.array(ids))
        write_table(fs, storage.join(job.staging, f"border-{k:05d}.parquet"), outer)
        for b, rows in _by_bucket(outer, job.buckets, job.cell_pixels).items():
            write_table(fs, storage.join(job.staging, f"cells-{k:05d}-{b:03d}.parquet"), rows)
    return out


def _by_bucket(outer: pa.Table, buckets: int, cell_pixels: int) -> dict[int, pa.Table]:
    """Border pieces listed in the bucket of every cell their extent covers, with the cell."""
    import pyarrow as pa
    import shapely

    bounds = shapely.bounds(shapely.from_wkb(outer.column("wkb").to_numpy(False)))
    res = outer.column("res").to_numpy()
    crs = outer.column("crs").to_pylist()
    classes = outer.column("class_id").to_pylist()
    rows: dict[int, tuple[list[int], list[str]]] = {}
    for i, (x0, y0, x1, y1) in enumerate(bounds):
        size = cell_pixels * res[i]
        for cx in range(int(np.floor(x0 / size)), int(np.floor(x1 / size)) + 1):
            for cy in range(int(np.floor(y0 / size)), int(np.floor(y1 / size)) + 1):
                cell = f"{crs[i]}|{res[i]:.9g}|{classes[i]}|{cx}|{cy}"
                b = hash_bucket(cell, buckets)
                got = rows.setdefault(b, ([], []))
                got[0].append(i)
                got[1].append(cell)
    keep = ["id", "wkb", "res"]
    return {
        b: outer.select(keep).take(pa.array(idx)).append_column("cell", pa.array(cells))
        for b, (idx, cells) in rows.items()
    }


def hash_bucket(cell: str, buckets: int) -> int:
    """The bucket of a cell, the same in every process (not Python's salted ``hash``)."""
    return zlib.crc32(cell.encode()) % buckets


def pair_bucket(job: LayerJob, b: int, chunks: list[int]) -> np.ndarray:
    """Ray task: the ids of pieces that share an edge within one cell, for the cells of bucket
    ``b``, as (N, 2) pairs."""
    import pyarrow as pa
    import shapely

    fs, tables = job.fs(), []
    for k in chunks:
        uri = storage.join(job.staging, f"cells-{k:05d}-{b:03d}.parquet")
        if fs.exists(uri):
            tables.append(read_table(fs, uri))
    if not tables:
        return np.empty((0, 2), np.int64)
    table = pa.concat_tables(tables)
    cells = table.column("cell").to_pylist()
    ids = table.column("id").to_numpy()
    res = table.column("res").to_numpy()
    geoms = shapely.from_wkb(table.column("wkb").to_numpy(False))
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(cell, []).append(i)
    pairs: list[tuple[int, int]] = []
    for rows in groups.values():
        tolerance = res[rows[0]] * polygons.SNAP_PIXELS
        for group in polygons.components([geoms[i] for i in rows], tolerance):
            pairs += [(int(ids[rows[group[0]]]), int(ids[rows[j]])) for j in group[1:]]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def join_bucket(
    job: LayerJob, b: int, chunks: list[int], roots: tuple[np.ndarray, np.ndarray]
) -> str | None:
    """Ray task: the groups whose root falls in bucket ``b`` (pieces in no pair are their own
    group) joined into one polygon each, finished and staged; returns the staged URI."""
    import shapely

    fs, rows = job.fs(), []
    for k in chunks:
        table = read_table(fs, storage.join(job.staging, f"border-{k:05d}.parquet"))
        for row in table.to_pylist():
            row["root"] = polygons.root_of(roots, row["id"])
            if row["root"] % job.buckets == b:
                rows.append(row)
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["root"], []).append(row)
    merged = []
    for pieces in groups.values():
        first = pieces[0]
        tolerance = first["res"] * polygons.SNAP_PIXELS
        geom = polygons.merge([shapely.from_wkb(p["wkb"]) for p in pieces], tolerance)
        sources = sorted({p["source"] for p in pieces})
        merged.append(
            {
                **first,
                "wkb": shapely.to_wkb(geom),
                "pixels": sum(p["pixels"] for p in pieces),
                "score_sum": sum(p["score_sum"] for p in pieces),
                "source": ";".join(sources),
                "run_id": max(p["run_id"] for p in pieces),
            }
        )
    layer = finished(job, merged)
    if not len(layer):
        return None
    uri = storage.join(job.staging, f"joined-{b:03d}.parquet")
    write_table(fs, uri, layer)
    return uri


def finished(job: LayerJob, rows: list[dict[str, Any]]) -> pa.Table:
    """Polygons of parts as rows of the layer: at least ``min_area`` pixels, simplified,
    in the layer's CRS, with their area and mean score."""
    import pyarrow as pa
    import shapely

    c = job.config
    rows = [r for r in rows if r["pixels"] >= c.min_area]
    by_grid: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        by_grid.setdefault((r["crs"], r["res"]), []).append(r)
    out: dict[str, list[Any]] = {name: [] for name in layer_schema().names}
    for (crs, res), group in by_grid.items():
        geoms = shapely.from_wkb([r["wkb"] for r in group])
        target = crs if c.vectors_crs == "native" else c.vectors_crs
        done, areas = polygons.finish(list(geoms), crs or None, target, c.simplify * res)
        for r, geom, area in zip(group, done, areas, strict=True):
            out["geometry"].append(shapely.to_wkb(geom))
            out["class_id"].append(r["class_id"])
            out["class_name"].append(job.names[r["class_id"]])
            out["area_m2"].append(area)
            out["score"].append(r["score_sum"] / max(r["pixels"], 1))
            out["pixels"].append(r["pixels"])
            out["source"].append(r["source"])
            out["model_version"].append(job.model_version)
            out["run_id"].append(r["run_id"])
    return pa.table(out, schema=layer_schema())


def layer_crs(config: PredictConfig, found: set[str]) -> str | None:
    """The layer's CRS: ``vectors_crs``, or with ``native`` the one CRS of every mask (None for
    masks without a georeference, whose polygons are in pixels)."""
    from segray.errors import ConfigError

    if config.vectors_crs != "native":
        return config.vectors_crs
    if len(found) > 1:
        raise ConfigError(
            f"vectors_crs native needs masks of one CRS, found {len(found)} "
            f"({', '.join(sorted(found)[:3])}…): name a CRS, such as EPSG:4326"
        )
    return next(iter(found), "") or None


def write_layer(config: PredictConfig, staged: list[str], crs: str | None) -> tuple[str, int]:
    """The staged parts written one after another to a local file, copied whole to the URI."""
    uri = config.vectors
    ext = layer_format(uri)
    fs = config.fs(config.output)
    with tempfile.TemporaryDirectory(prefix="segray-vectors-") as tmp:
        path = os.path.join(tmp, "layer" + ext)
        writer = LayerWriter(path, ext, crs)
        for part in staged:
            writer.write(read_table(fs, part))
        writer.close()
        config.fs(uri).write_file(uri, path)
    return uri, writer.count


def _remove(job: LayerJob) -> None:
    """The staged files of this layer, once it is written."""
    for uri in (fs := job.fs()).list_files(job.staging):
        fs.delete(uri)
    if os.path.isdir(job.staging):  # a local folder: its files are gone, it goes too
        shutil.rmtree(job.staging, ignore_errors=True)
