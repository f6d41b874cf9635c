"""What a bulk prediction job reads and what it leaves as its receipt.

Inputs: a folder, prefix or list of URIs, minus those whose outputs exist (:func:`plan`): the
mask, and beside it, when the job makes them, its uncertainty map and its footprints. Receipt: one
Parquet row per input and the job's verdict (:class:`Manifest`, :class:`PredictResult`).

Each run writes ``<output>/_manifest/run-<UTC time>-<id>/part-00000.parquet`` (a new part every
``rows_per_part`` rows, so the driver's memory stays flat on millions of tiles, and every
``flush_s`` seconds, so a run killed midway leaves a receipt of nearly all it finished). Every part
is written whole, and a rerun writes a new run folder, so no earlier receipt is ever overwritten;
the rerun's ``skipped`` rows take their class fractions from the earlier runs' ``ok`` rows
(:func:`finished_rows`). When the output can take no more writes (disk full, read-only), the rest
of the receipt goes to a local folder (:func:`fallback_folder`) that the summary names.
:func:`read_manifest` reads one run folder, or every run under ``<output>/_manifest``.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.bulk.sinks import MASK_COLUMN, Sink, file_columns
from segray.errors import StorageError
from segray.io import storage
from segray.io.files import FileSystem

if TYPE_CHECKING:
    import pyarrow as pa


MANIFEST_DIR = "_manifest"
STATUSES = ("ok", "skipped", "error")
#: Errors quoted in the printed summary; the manifest has all of them.
SUMMARY_ERRORS = 5

log = logging.getLogger(__name__)


# --- the receipt -------------------------------------------------------------------------------


def schema() -> pa.Schema:
    """Columns of a manifest: the file of every kind of sink that writes one beside each mask
    (:func:`segray.bulk.sinks.file_columns`) after the input and its outcome."""
    import pyarrow as pa

    return pa.schema(
        [
            ("input_uri", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            *((column, pa.string()) for column in file_columns()),
            ("class_fractions", pa.list_(pa.float64())),
            ("model_uri", pa.string()),
            ("model_version", pa.string()),
            ("seconds", pa.float64()),
        ]
    )


@dataclass
class PredictResult:
    """What a job did: counts by status, the first errors, where its manifest is."""

    counts: dict[str, int]
    errors: list[tuple[str, str]]
    manifest: str
    seconds: float
    max_error_rate: float = 0.0
    #: Why the job stopped before its end (the output could take no more writes), else "".
    stopped: str = ""
    #: Where the receipt went when the output could not take it.
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Inputs seen, whatever their status."""
        return sum(self.counts.values())

    @property
    def error_rate(self) -> float:
        """Fraction of inputs that ended in ``error`` (0 when there were none)."""
        return self.counts.get("error", 0) / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        """False when the job stopped early or its error fraction exceeds ``max_error_rate``:
        the job's exit status."""
        return not self.stopped and self.error_rate <= self.max_error_rate

    def summary(self) -> str:
        """A few lines for people: counts, throughput, the first errors, the manifest."""
        done = self.counts.get("ok", 0)
        rate = done / self.seconds if self.seconds > 0 else 0.0
        counts = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in STATUSES)
        lines = [f"predict: {self.total} input(s): {counts} in {self.seconds:.1f} s"]
        lines[0] += f" ({rate:.1f} predicted/s)"
        lines += [f"  error: {reason}" for _, reason in self.errors]
        more = self.counts.get("error", 0) - len(self.errors)
        if more > 0:
            lines.append(f"  ... and {more} more error(s) in the manifest")
        verdict = "ok" if self.ok else "FAILED"
        lines.append(
            f"  error rate {self.error_rate:.2%} (max {self.max_error_rate:.2%}): {verdict}"
        )
        if self.stopped:
            lines.append(f"  STOPPED: {self.stopped}; a rerun does the rest")
        lines.append(f"  manifest: {self.manifest}")
        lines += [f"  manifest: {note}" for note in self.notes]
        return "\n".join(lines)


class Manifest(Sink):
    """Collects manifest rows and writes them in whole Parquet parts under the output prefix:
    the sink of a job's receipt. ``files`` names the files a job makes for a mask, by manifest
    column (:func:`segray.bulk.sinks.outputs`), for the rows of masks it did not see made."""

    def __init__(
        self,
        output: str,
        model_uri: str,
        model_version: str,
        *,
        fs: FileSystem | None = None,
        rows_per_part: int = 10_000,
        flush_s: float = 30.0,
        files: Callable[[str], dict[str, str | None]] | None = None,
    ) -> None:
        run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        self.uri = storage.join(output, MANIFEST_DIR, f"run-{run}")
        self.model = (model_uri, model_version)
        self.fs = fs or storage.filesystem(output)  # of the parts: a local fallback when full
        self.output, self._output_fs, self._todo = output, self.fs, []
        self.files = files or (lambda mask: {MASK_COLUMN: mask})
        self.rows_per_part, self.flush_s = rows_per_part, flush_s
        self._flushed_at = time.monotonic()
        self._run = f"run-{run}"
        self.notes: list[str] = []
        self.counts = dict.fromkeys(STATUSES, 0)
        self.errors: list[tuple[str, str]] = []
        self._rows: dict[str, list[Any]] = {name: [] for name in schema().names}
        self._parts = 0
        self._written: list[tuple[str, FileSystem]] = []  # (part, where) of each part
        # every part is also kept in a local spool until the run closes with its receipt whole
        # in the output: an output lost mid-job (a deleted bucket, a dead endpoint) still
        # leaves the whole receipt here, where the summary says
        self._spool = fallback_folder(self._run)
        self._fell_back = self._spool_failed = False

    @property
    def run_id(self) -> str:
        """This run's id, ``run-<UTC time>-<hex>``."""
        return self._run

    def add(
        self,
        input_uri: str,
        status: str,
        error: str = "",
        output_uri: str | None = None,
        class_fractions: Sequence[float] | None = None,
        seconds: float = 0.0,
        **files: str | None,
    ) -> None:
        """Record one input's outcome: its mask ``output_uri`` and ``files`` beside it by column
        (:func:`segray.bulk.sinks.file_columns`; empty or None: no such file)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {status!r}")
        unknown = set(files) - set(file_columns())
        if unknown:
            raise ValueError(f"no manifest column {sorted(unknown)}; files are {file_columns()}")
        files = {c: files.get(c) or None for c in file_columns()}
        files[MASK_COLUMN] = output_uri or None
        fractions = None
        if class_fractions is not None and not np.isnan(class_fractions).any():
            fractions = [float(f) for f in class_fractions]
        row = {
            "input_uri": str(input_uri),
            "status": status,
            "error": error or None,
            **files,
            "class_fractions": fractions,
            "model_uri": self.model[0],
            "model_version": self.model[1],
            "seconds": float(seconds),
        }
        for name, value in row.items():
            self._rows[name].append(value)
        self.counts[status] += 1
        if status == "error" and len(self.errors) < SUMMARY_ERRORS:
            self.errors.append((str(input_uri), error))
        if len(self._rows["input_uri"]) >= self.rows_per_part or (
            time.monotonic() - self._flushed_at >= self.flush_s
        ):
            self.flush()

    def add_batch(self, batch: dict[str, Any]) -> None:
        """Record a batch of rows (columns ``input_uri``, ``status``, ``error``,
        ``class_fractions``, ``seconds``, and any of :func:`segray.bulk.sinks.file_columns`), as
        the prediction stages return them."""
        columns = [c for c in file_columns() if c in batch]
        for i, uri in enumerate(batch["input_uri"]):
            files = {c: str(batch[c][i] or "") for c in columns}
            self.add(
                uri,
                str(batch["status"][i]),
                str(batch["error"][i] or ""),
                class_fractions=batch["class_fractions"][i],
                seconds=float(batch["seconds"][i]),
                **files,
            )

    def record_settled(self, done: list, todo: list[tuple[str, str]]) -> None:
        """Rows of the inputs settled before the run: refused ones (``error``, the reason in
        ``done``), and those whose outputs exist (``skipped``, with the class fractions of the
        run that made them); ``todo`` (input, mask) are this run's, for :meth:`on_write_failed`."""
        self._todo = todo
        earlier = None
        for input_uri, output_uri, reason in done:
            if reason:
                self.add(input_uri, "error", reason)
                continue
            if earlier is None:
                earlier = finished_rows(self.output, self._output_fs)
            fractions = earlier.get(input_uri)
            self.add(input_uri, "skipped", class_fractions=fractions, **self.files(output_uri))

    def on_rows(self, rows: dict[str, Any]) -> None:
        self.add_batch(rows)

    def on_write_failed(self, reason: str) -> None:
        """After an early stop: the masks that blocks in flight finished but the driver never
        saw get ``ok`` rows too (their class fractions unknown), so the receipt covers every
        mask the run wrote. A mask is written last and whole, so one that exists is complete."""
        seen = self.inputs()
        try:
            present = self.settled_outputs()
        except StorageError as exc:  # the output itself is gone: the rows seen are all we know
            log.warning("manifest: cannot list %s (%s)", self.output, exc)
            return
        for input_uri, output_uri in self._todo:
            if input_uri not in seen and output_uri in present:
                self.add(input_uri, "ok", **self.files(output_uri))

    def settled_outputs(self, pause_s: float = 1.0, limit_s: float = 60.0) -> set[str]:
        """The files under the output once writes already under way have landed: listed until
        two listings a pause apart agree (a write task running when the job stopped takes
        under a second; none is started after)."""
        listing = self._output_fs.list_files
        present, deadline = set(listing(self.output)), time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(pause_s)
            again = set(listing(self.output))
            if again == present:
                break
            present = again
        return present

    def flush(self) -> None:
        """Write the rows collected so far as the next part (nothing when there are none)."""
        if not self._rows["input_uri"] and self._parts:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(self._rows, schema=schema())
        sink = io.BytesIO()
        pq.write_table(table, sink)
        name = f"part-{self._parts:05d}.parquet"
        data = sink.getvalue()
        spooled = self._spool_part(name, data)
        if not self._fell_back:
            try:
                self.fs.write_bytes(storage.join(self.uri, name), data)
            except OSError as exc:  # StorageError is one
                # the rest of the receipt stays where it can be written: the whole of it is in
                # the spool, and the summary says where
                held = "the whole receipt" if spooled else "the rest"
                self.notes.append(
                    f"{self._parts} part(s) in {self.uri}; {held} in {self._spool} ({exc})"
                )
                log.warning("manifest: %s; the receipt is in %s", exc, self._spool)
                self.uri, self.fs, self._fell_back = self._spool, storage.LOCAL, True
                if not spooled:
                    self.fs.write_bytes(storage.join(self.uri, name), data)
        where = (self._spool, storage.LOCAL) if spooled or self._fell_back else (self.uri, self.fs)
        self._written.append((storage.join(where[0], name), where[1]))
        self._parts += 1
        self._flushed_at = time.monotonic()
        self._rows = {name: [] for name in schema().names}

    def _spool_part(self, name: str, data: bytes) -> bool:
        """Keep a copy of a part in the local spool; a spool that cannot be written (a full or
        read-only temporary folder) is given up with one warning, never the job."""
        if self._spool_failed:
            return False
        try:
            storage.LOCAL.write_bytes(storage.join(self._spool, name), data)
            return True
        except OSError as exc:  # StorageError is one
            log.warning("manifest: no local copy of the receipt (%s)", exc)
            self._spool_failed = True
            return False

    def inputs(self) -> set[str]:
        """Every input recorded so far in this run (its parts read back, and the rows not yet
        written): for a job that stops early and must find what it has not recorded."""
        import pyarrow.parquet as pq

        seen = set(self._rows["input_uri"])
        for part, fs in self._written:
            data = io.BytesIO(fs.read_bytes(part))
            seen.update(pq.read_table(data, columns=["input_uri"]).column(0).to_pylist())
        return seen

    def close(
        self, seconds: float, max_error_rate: float = 0.0, stopped: str = ""
    ) -> PredictResult:
        """Write the last part and return the job's result."""
        if self._rows["input_uri"] or not self._parts:
            self.flush()
        if not self._fell_back:  # the output holds the whole receipt: the spool is spent
            shutil.rmtree(self._spool, ignore_errors=True)
        return PredictResult(
            dict(self.counts),
            list(self.errors),
            self.uri,
            seconds,
            max_error_rate,
            stopped,
            list(self.notes),
        )


def fallback_folder(run: str) -> str:
    """A local folder for a receipt the output cannot take: ``$SEGRAY_MANIFEST_FALLBACK``, else
    ``segray-manifests/`` in the system's temporary folder."""
    root = os.environ.get("SEGRAY_MANIFEST_FALLBACK") or os.path.join(
        tempfile.gettempdir(), "segray-manifests"
    )
    return os.path.join(os.path.abspath(root), run)


def finished_rows(output: str, fs: FileSystem) -> dict[str, list[float] | None]:
    """``{input_uri: class fractions}`` of every input an earlier run into ``output`` finished
    (``ok`` rows; the newest run wins), for the ``skipped`` rows of a rerun."""
    import pyarrow.parquet as pq

    found: dict[str, list[float] | None] = {}
    for folder in run_folders(output, fs):
        for part in fs.list_files(folder, suffixes=".parquet"):
            data = io.BytesIO(fs.read_bytes(part))
            table = pq.read_table(data, columns=["input_uri", "status", "class_fractions"])
            rows = zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
            found.update((uri, fr) for uri, status, fr in rows if status == "ok")
    return found


def read_manifest(uri: str, fs: FileSystem | None = None) -> pa.Table:
    """A run's manifest (its folder), or every run's rows when given ``<output>/_manifest``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = fs or storage.filesystem(uri)
    parts = fs.list_files(uri, suffixes=".parquet")
    tables = [pq.read_table(io.BytesIO(fs.read_bytes(p))) for p in parts]
    if not tables:
        return schema().empty_table()
    # parts written before a column was added lack it: it reads as null there
    return pa.concat_tables(tables, promote_options="default")


def run_folders(output: str, fs: FileSystem | None = None) -> list[str]:
    """The manifest folders of every run into ``output``, oldest first."""
    folder = storage.join(output, MANIFEST_DIR)
    parts = (fs or storage.filesystem(output)).list_files(folder)
    return sorted({p.rsplit("/", 1)[0] for p in parts})


def statuses(table: pa.Table) -> dict[str, int]:
    """Counts by status of a manifest table."""
    values: Iterable[str] = table.column("status").to_pylist()
    return {s: sum(1 for v in values if v == s) for s in STATUSES}
