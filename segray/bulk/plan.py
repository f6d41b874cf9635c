"""What a bulk job reads and where each output goes: the inputs (a folder, a prefix or a list of
URIs), minus those whose outputs exist; the mask's URI and the files made beside it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from segray.bulk.sinks import outputs
from segray.errors import ConfigError, SegrayError, StorageError
from segray.io import stac, storage
from segray.io.imagery import TILE_SUFFIXES

if TYPE_CHECKING:
    from segray.bulk.config import PredictConfig
    from segray.io.files import FileSystem


SCENE_SUFFIXES = (".tif", ".tiff")


def plan(config: PredictConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """``(todo, done)``: inputs to predict as ``(input, output)``, and inputs settled already as
    ``(input, output, reason)`` (reason empty: every output exists and is skipped; else an error).

    ``output`` is the mask's URI; :func:`segray.bulk.sinks.outputs` gives the files made beside
    it."""
    todo, done, _ = plan_sources(config)
    return todo, done


def plan_sources(
    config: PredictConfig,
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]], dict[str, dict[str, str]]]:
    """:func:`plan`, and the STAC item each mask is made from: ``{mask URI: {"href", "id",
    "datetime"}}`` (empty without ``stac``)."""
    existing = set() if config.overwrite else set(list_outputs(config))
    todo, done, claimed = [], [], {}
    if config.stac_items:
        claimed[storage.join(config.output, stac.COLLECTION_FILE)] = "the output's STAC collection"
    sources: dict[str, dict[str, str]] = {}
    for uri, out, refused, source in stac_candidates(config) if config.stac else candidates(config):
        if refused:
            done.append((uri, "", refused))
            continue
        files = [f for f in outputs(out, config).values() if f]
        clash = next((f for f in files if f in claimed), None)
        if clash is not None:
            reason = f"{uri}: its output {clash} is already made from {claimed[clash]}"
            done.append((uri, out, reason))
            continue
        if all(f in existing for f in files):
            done.append((uri, out, ""))
        else:
            todo.append((uri, out))
        for f in files:
            claimed.setdefault(f, uri)
        if source:
            sources[out] = source
    return todo, done, sources


Candidate = tuple[str, str, str, dict[str, str] | None]


def candidates(config: PredictConfig) -> Iterator[Candidate]:
    """``(input, mask URI, refusal, None)`` of each listed input (refusal empty: fine)."""
    base, uris = list_inputs(config)
    links = set(config.fs(base).links(base)) if not config.manifest else set()
    for link in sorted(links):
        yield link, "", f"{link}: a symbolic link; links in a local input are not followed", None
    uris = [uri for uri in uris if uri not in links]
    odd = not_files(config, uris)
    for uri in uris:
        if uri in odd:
            yield uri, "", f"{uri}: {odd[uri]}, not a file; refused before it is opened", None
        else:
            yield uri, *output_for(config, base, uri), None


def not_files(config: PredictConfig, uris: list[str]) -> dict[str, str]:
    """The inputs that are no regular file (a named pipe, a device, a folder), by what they
    are: reading one could block for ever or never end."""
    found: dict[str, str] = {}
    for fs, group in itertools.groupby(uris, key=config.fs):
        found.update(fs.not_files(group))
    return found


def stac_candidates(config: PredictConfig) -> Iterator[Candidate]:
    """``(asset href, mask URI, refusal, source)`` of each item of the ``stac`` file: the mask
    is named by the item's id (:func:`segray.io.stac.safe_name`); an item without the asset, or
    whose id still names no file under the output, is refused on its own row."""
    items = stac.read_items(config.stac or "", config.fs(config.stac or ""))
    for item in sorted(items, key=lambda i: (i.id, i.href)):
        source = {"href": item.href, "id": item.id, "datetime": item.datetime or ""}
        try:
            uri = storage.parse(item.asset(config.asset)).uri
        except SegrayError as exc:  # no such asset, or a scheme segray cannot read
            reason = str(exc)
            if not reason.startswith("STAC item"):
                reason = f"STAC item {item.id!r} ({item.href}): {reason}"
            yield f"{item.href}#{item.id}", "", reason, None
            continue
        odd = config.fs(uri).not_files([uri])
        if odd:
            yield uri, "", f"STAC item {item.id!r}: {uri}: {odd[uri]}, not a file; refused", None
            continue
        ext = os.path.splitext(uri)[1].lower()
        name = stac.safe_name(item.id)
        name += ".tif" if config.scene or ext in SCENE_SUFFIXES else ".png"
        out, refused = placed(config, uri, name)
        yield uri, out, refused and f"STAC item {item.id!r}: {refused}", source


def list_inputs(config: PredictConfig) -> tuple[str, list[str]]:
    """``(base, uris)``: the input URIs, sorted, and the base their output paths are relative to.

    Anything under the output prefix (earlier masks, manifests) is never an input.
    """
    suffixes = config.suffixes or (SCENE_SUFFIXES if config.scene else TILE_SUFFIXES)
    if config.manifest:
        listing = read_uri_list(config.manifest, config.fs(config.manifest))
        uris = [storage.parse(u).uri for u in listing]
        base = config.input or common_base(uris)
    else:
        base, fs = config.input, config.fs(config.input)
        uris = fs.list_files(base, suffixes=suffixes, pattern=config.pattern)
        if not uris and base.lower().endswith(suffixes) and fs.exists(base):
            uris = [storage.parse(base).uri]
    out = storage.parse(config.output).uri.rstrip("/") + "/"
    return base, sorted({u for u in uris if not u.startswith(out)})


def list_outputs(config: PredictConfig) -> list[str]:
    """Masks already under the output prefix (temporary ``.tmp-*`` files are not listed)."""
    return config.fs(config.output).list_files(config.output)


def read_uri_list(uri: str, fs: FileSystem) -> list[str]:
    """URIs from a Parquet file (``input_uri`` or ``uri`` column) or a text file (one a line)."""
    data = fs.read_bytes(uri)
    if uri.lower().endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        column = next((c for c in ("input_uri", "uri") if c in table.column_names), None)
        if column is None:
            raise ConfigError(f"{uri}: a URI list needs an 'input_uri' or 'uri' column")
        return [u for u in table.column(column).to_pylist() if u]
    lines = (line.strip() for line in data.decode("utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def common_base(uris: Iterable[str]) -> str:
    """The deepest folder holding every URI (all local, or all in one S3 bucket)."""
    parts = [storage.parse(u).uri.split("/")[:-1] for u in uris]
    if not parts:
        raise ConfigError("the URI list is empty")
    common = os.path.commonprefix(parts)
    base = "/".join(common)
    if base.startswith("s3:") and len(common) < 3:
        raise ConfigError("the listed URIs span several buckets: give input as their common base")
    return base or "/"


def output_for(config: PredictConfig, base: str, uri: str) -> tuple[str, str]:
    """``(mask URI, "")`` for an input, or ``("", reason)`` when its mask would not lie under the
    output: an input outside ``base``, or a relative path that is absolute or climbs out (``..``).
    """
    try:
        relative = storage.relative_to(base, uri) or uri.rsplit("/", 1)[-1]
    except StorageError:
        return "", f"{uri}: not under the input {base}, so its mask has no place under the output"
    return placed(config, uri, mask_uri(config.output, relative, config.scene), relative)


def placed(
    config: PredictConfig, uri: str, mask: str, relative: str | None = None
) -> tuple[str, str]:
    """``(mask URI, "")``, or ``("", reason)`` when ``relative`` (default: the mask's path
    below the output) is absolute or has ``..``/``.``/empty parts, or the mask would not lie
    under the output."""
    if relative is None:
        relative, mask = mask, storage.join(config.output, mask)
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("..", ".", "") for p in parts):
        return "", f"{uri}: its relative path {relative!r} would leave the output; refused"
    if not storage.lies_under(config.output, mask):
        return "", f"{uri}: its mask {mask} would lie outside the output {config.output}; refused"
    return mask, ""


def mask_uri(output: str, relative: str, scene: bool = False) -> str:
    """Where the mask of an input at ``relative`` goes: ``.tif`` for TIFF inputs, else ``.png``."""
    stem, ext = os.path.splitext(relative)
    return storage.join(
        output, stem + (".tif" if scene or ext.lower() in SCENE_SUFFIXES else ".png")
    )
