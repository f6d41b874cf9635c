"""STAC out for a bulk job: the item written beside each mask (by the task that writes the mask)
and, at the end of the job, ``collection.json`` at the output root over every mask of the job,
those of earlier runs that it skipped included (their items exist beside them).

The documents themselves are made by :mod:`segray.io.stac`; this module fills them from the job.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from segray.bulk.outputs import item_uri
from segray.errors import SegrayError
from segray.io import stac, storage

if TYPE_CHECKING:
    from segray.bulk.config import PredictConfig
    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)


def item_options(
    config: PredictConfig, card: ModelCard, legend: dict[str, Any]
) -> dict[str, Any] | None:
    """What a writer needs to make the STAC item of a mask (None when ``stac_items`` is off):
    the class names the mask's values stand for, a description, the job's time."""
    if not config.stac_items:
        return None
    tags = legend.get("tags") or {}
    if "CLASS_NAMES" in tags:
        classes = json.loads(tags["CLASS_NAMES"])
        what = ", ".join(f"{i} {name}" for i, name in enumerate(classes))
        description = f"Class ids predicted by segray ({what}; 255 no data)"
    else:
        classes = [tags.get("PROBABILITY_OF", card.names()[config.class_index])]
        description = f"Probability of {classes[0]} predicted by segray (x 254; 255 no data)"
    description += f", model {card.name} {card.version}".rstrip()
    return {
        "root": config.output,
        "collection_id": collection_id(config),
        "classes": classes,
        "description": description,
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def collection_id(config: PredictConfig) -> str:
    """The output collection's id: ``segray-`` and the output folder's name."""
    name = storage.parse(config.output).uri.rstrip("/").rsplit("/", 1)[-1]
    return "segray-" + (re.sub(r"[^A-Za-z0-9._-]", "_", name) or "masks")


def item_file(
    mask_uri: str,
    crs: str | None,
    transform: Any,
    shape: tuple[int, int],
    input_uri: str,
    source: dict[str, str] | None,
    options: dict[str, Any],
) -> tuple[str, bytes]:
    """``(URI, bytes)`` of the STAC item beside the mask at ``mask_uri`` (of ``shape``, at
    ``transform`` in ``crs``), made from ``input_uri`` or from the STAC item ``source``."""
    uri = item_uri(mask_uri)
    doc = stac.mask_item(
        uri,
        mask_uri,
        options["root"],
        geo=stac.footprint(crs, transform, shape),
        source=source["href"] if source else input_uri,
        source_id=source["id"] if source else None,
        datetime=(source or {}).get("datetime") or options["datetime"],
        classes=options["classes"],
        description=options["description"],
        collection_id=options["collection_id"],
    )
    return uri, json.dumps(doc, indent=1).encode()


#: Items read back at once to build the collection (read a part at a time, folded in).
ITEMS_AT_ONCE = 1000


def write_collection(
    config: PredictConfig, card: ModelCard, masks: list[str], threads: int = 16
) -> str | None:
    """Write ``collection.json`` at the output root over the items beside ``masks`` (read back
    for their extent, a thread pool at a time); returns its URI. An item that cannot be read is
    left out with a warning; no masks: nothing written, None. A collection that would not change
    is not written again."""
    if not masks:
        return None
    out = config.fs(config.output)

    def read(mask: str) -> tuple[str, dict[str, Any]] | None:
        uri = item_uri(mask)
        try:
            return storage.relative_to(config.output, uri), stac.read_json(uri, out)
        except SegrayError as exc:
            log.warning("STAC collection: item left out: %s", exc)
            return None

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        names = sorted(set(masks))
        with ThreadPoolExecutor(threads) as pool:  # a part at a time: no more items held
            for start in range(0, len(names), ITEMS_AT_ONCE):
                part = pool.map(read, names[start : start + ITEMS_AT_ONCE])
                yield from (found for found in part if found)

    doc = stac.collection(
        collection_id(config),
        items(),
        description=f"Masks predicted by segray with model {card.name} {card.version}".rstrip(),
    )
    if config.vectors and config.fs(config.vectors).exists(config.vectors):
        doc.setdefault("assets", {})["vectors"] = vectors_asset(config)
    uri, text = storage.join(config.output, stac.COLLECTION_FILE), json.dumps(doc, indent=1)
    try:  # a rerun that changed nothing rewrites nothing
        unchanged = out.read_text(uri) == text
    except SegrayError:
        unchanged = False
    if not unchanged:
        out.write_text(uri, text)
    return uri


#: Media types of the vector layer's formats.
LAYER_TYPES = {
    ".parquet": "application/vnd.apache.parquet",
    ".geoparquet": "application/vnd.apache.parquet",
    ".fgb": "application/vnd.flatgeobuf",
    ".gpkg": "application/geopackage+sqlite3",
}


def vectors_asset(config: PredictConfig) -> dict[str, Any]:
    """The collection's asset for the job's vector layer (relative when under the output)."""
    uri = str(config.vectors)
    relative = storage.relative_to(config.output, uri)
    ext = next((e for e in LAYER_TYPES if uri.lower().endswith(e)), "")
    return {
        "href": f"./{relative}" if relative and not relative.startswith("..") else uri,
        "type": LAYER_TYPES.get(ext, "application/octet-stream"),
        "title": "Polygons of the job's masks, merged across seams",
        "roles": ["data"],
    }
