"""STAC in and out, local or s3://: items read from an ItemCollection, a catalog or a collection
(links followed), and the STAC documents of predicted masks (a label item per mask, a collection
over them) made as plain dicts for :mod:`segray.io.storage` to write whole.

Reading never uses pystac's own I/O: the text is read through a FileSystem, parsed with
pystac from dicts, and relative hrefs are resolved here (:func:`resolve`) against the URI of the
file they were read from (or the item's own absolute ``self`` link), so s3:// works like a path.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from segray.errors import DatasetError, StorageError
from segray.io import gdal, storage
from segray.io.files import FileSystem

#: The media type and roles of a predicted mask asset.
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
PNG_TYPE = "image/png"
MASK_ASSET = "labels"
#: Media types of assets that are rasters segray can predict (any ``image/tiff…`` too).
RASTER_TYPES = ("image/tiff", "image/png", "image/jpeg", "image/jp2")
#: The collection file at the root of an output.
COLLECTION_FILE = "collection.json"
#: Characters kept in a file name made from an item id; any other becomes ``_``.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SCHEMES = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_THREADS = 16
#: Roles of image assets that are never the one to predict.
PREVIEWS = frozenset({"thumbnail", "overview"})


@dataclass(frozen=True)
class StacInput:
    """One STAC item as an input: ``href`` is the file it was read from (the item's own file, or
    the ItemCollection holding it, or its absolute ``self`` link there); ``assets`` maps each key
    to its resolved href; ``rasters`` are the keys an asset is chosen from when none is named:
    those with the ``data`` role, else those of an image media type that are no thumbnail or
    overview."""

    id: str
    href: str
    assets: dict[str, str]
    rasters: tuple[str, ...]
    bbox: tuple[float, ...] | None
    datetime: str | None
    labels: tuple[str, ...] = ()  # assets with the "labels" role (the label extension's)

    def label_asset(self) -> str | None:
        """The href of the item's one labels asset (None without one); several: an error."""
        if len(self.labels) > 1:
            keys = ", ".join(self.labels)
            raise DatasetError(
                f"STAC item {self.id!r} ({self.href}) has several labels assets: {keys}"
            )
        return self.assets[self.labels[0]] if self.labels else None

    def asset(self, key: str | None = None) -> str:
        """The href of asset ``key``; without a key, of the item's one raster asset. Raises a
        :class:`DatasetError` naming the item and the keys it has."""
        if key is not None:
            if key in self.assets:
                return self.assets[key]
            why = f"has no asset {key!r}"
        elif len(self.rasters) == 1:
            return self.assets[self.rasters[0]]
        else:
            kind = "several raster assets" if self.rasters else "no raster asset"
            why = f"has {kind} (image media type or role 'data'): give --asset"
        keys = ", ".join(self.assets) or "none"
        raise DatasetError(f"STAC item {self.id!r} ({self.href}) {why}; its assets: {keys}")


def resolve(base: str, href: str) -> str:
    """``href`` as an absolute URI: itself when it has a scheme or is an absolute path, else
    relative to the folder of ``base`` (a local path or s3:// URI), ``./`` and ``../`` resolved."""
    if not href:
        raise StorageError(f"{base}: an empty href")
    if href.startswith("file://"):
        return storage.parse(href).uri
    if _SCHEMES.match(href) or href.startswith("/"):
        return href
    loc = storage.parse(base)
    if loc.scheme == "s3":
        key = posixpath.normpath(posixpath.join("/" + posixpath.dirname(loc.path), href))
        return f"s3://{loc.bucket}{key}"
    return os.path.normpath(os.path.join(os.path.dirname(loc.path), href))


def read_items(uri: str, fs: FileSystem | None = None) -> list[StacInput]:
    """Every item of a STAC ItemCollection (a GeoJSON FeatureCollection), a single item, or a
    catalog or collection whose ``child`` and ``item`` links are followed to any depth; items
    reached twice are read once. Errors name the file: :class:`StorageError` when one cannot
    be read, :class:`DatasetError` when it is not STAC. ``fs`` holds every file reached (by
    default the one :func:`storage.filesystem` chooses for ``uri``)."""
    fs = fs or storage.filesystem(uri)
    found: dict[str, StacInput] = {}
    seen: set[str] = set()
    level = [storage.parse(uri).uri]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        while level:
            seen.update(level)
            docs = list(pool.map(lambda u: (u, read_json(u, fs)), level))
            level = []
            for where, doc in docs:
                for item in _items_of(where, doc):
                    found.setdefault(f"{item.href}#{item.id}", item)
                for link in _links(where, doc):
                    if link not in seen:
                        seen.add(link)
                        level.append(link)
    return list(found.values())


def read_json(uri: str, fs: FileSystem | None = None) -> dict[str, Any]:
    """A JSON object read from a file or object; errors name the URI."""
    try:
        text = (fs or storage.filesystem(uri)).read_text(uri)
    except StorageError as exc:
        raise StorageError(f"cannot read STAC file: {exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{uri}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{uri}: not a STAC object (a JSON {type(doc).__name__})")
    return doc


def _links(where: str, doc: dict[str, Any]) -> list[str]:
    """The child and item links of a catalog or collection, resolved."""
    if doc.get("type") not in ("Catalog", "Collection"):
        return []
    links = doc.get("links") or []
    return [
        resolve(where, str(link["href"]))
        for link in links
        if isinstance(link, dict) and link.get("rel") in ("child", "item") and link.get("href")
    ]


def _items_of(where: str, doc: dict[str, Any]) -> list[StacInput]:
    """The items a STAC document holds itself (none for a catalog or collection)."""
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise DatasetError(f"{where}: a FeatureCollection without a 'features' list")
        return [_item(where, f, i) for i, f in enumerate(features)]
    if kind == "Feature":
        return [_item(where, doc, None)]
    if kind in ("Catalog", "Collection"):
        return []
    raise DatasetError(
        f"{where}: not a STAC ItemCollection, catalog, collection or item (type {kind!r})"
    )


def _item(where: str, doc: Any, index: int | None) -> StacInput:
    import pystac

    name = f"{where} feature {index}" if index is not None else where
    if not isinstance(doc, dict) or not doc.get("id"):
        raise DatasetError(f"{name}: not a STAC item (no 'id')")
    try:
        item = pystac.Item.from_dict(doc, migrate=False, preserve_dict=True)
    except Exception as exc:  # pystac raises KeyError, TypeError… on a malformed item
        raise DatasetError(f"{name}: not a STAC item ({type(exc).__name__}: {exc})") from None
    base = where
    if index is not None:  # in an ItemCollection: an item's absolute self link says where it is
        own = next((str(link.href) for link in item.links if link.rel == "self"), "")
        if own.startswith(("s3://", "/", "file://")):
            base = storage.parse(own).uri
    assets, data, images, labels = {}, [], [], []
    for key, asset in item.assets.items():
        assets[key] = resolve(base, asset.href)
        roles = set(asset.roles or [])
        if "labels" in roles or (key == MASK_ASSET and "data" not in roles):
            labels.append(key)  # the label extension's asset: training labels, not an image
        elif "data" in roles:
            data.append(key)
        elif (asset.media_type or "").lower().startswith(RASTER_TYPES) and not roles & PREVIEWS:
            images.append(key)
    rasters = data or images
    props = item.properties
    stamp = props.get("datetime") or props.get("start_datetime")
    bbox = tuple(float(v) for v in item.bbox) if item.bbox else None
    return StacInput(str(item.id), base, assets, tuple(rasters), bbox, stamp, tuple(labels))


def safe_name(item_id: str) -> str:
    """A file name from an item id: characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_`` (so no id holds a path separator); a caller still refuses ``.``/``..``."""
    return _UNSAFE.sub("_", item_id)


# --- STAC out ---------------------------------------------------------------------------------


@gdal.scoped
def footprint(crs: str | None, transform: Any, shape: Sequence[int]) -> tuple[list, dict] | None:
    """``(bbox, geometry)`` in WGS84 of a raster of ``shape`` (height, width) at ``transform``
    in ``crs``; None without a georeference."""
    if not crs or transform is None:
        return None
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    west, south, east, north = array_bounds(int(shape[0]), int(shape[1]), transform)
    w, s, e, n = transform_bounds(crs, "EPSG:4326", west, south, east, north, densify_pts=21)
    bbox = [round(v, 9) for v in (w, s, e, n)]
    ring = [[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]]]
    return bbox, {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def mask_item(
    item_uri: str,
    mask_uri: str,
    root: str,
    *,
    geo: tuple[list, dict] | None,
    source: str,
    source_id: str | None,
    datetime: str,
    classes: Sequence[str],
    description: str,
    collection_id: str,
) -> dict[str, Any]:
    """The STAC item (label extension, raster extension) of the mask at ``mask_uri``, to be
    written at ``item_uri`` beside it, in the collection at ``root``: a ``labels`` asset, a
    ``source`` link to the input (the STAC item, or the file), WGS84 ``geo`` from
    :func:`footprint` (None: null geometry, no bbox)."""
    from pystac.extensions.label import LabelExtension
    from pystac.extensions.raster import RasterExtension

    rel = storage.relative_to(root, item_uri)
    up = "../" * rel.count("/") or "./"
    to_collection = up + COLLECTION_FILE
    name = os.path.splitext(rel)[0].replace("/", "_")
    tif = mask_uri.lower().endswith((".tif", ".tiff"))
    asset = {
        "href": "./" + mask_uri.replace("\\", "/").rsplit("/", 1)[-1],
        "type": COG_TYPE if tif else PNG_TYPE,
        "title": "predicted mask",
        "roles": [MASK_ASSET],
        "raster:bands": [{"nodata": 255, "data_type": "uint8"}],
    }
    title = f"STAC item {source_id}" if source_id else "input image"
    source_type = "application/geo+json" if source_id else _image_type(source)
    source_link = {"rel": "source", "href": source, "title": title}
    if source_type:
        source_link["type"] = source_type
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [LabelExtension.get_schema_uri(), RasterExtension.get_schema_uri()],
        "id": source_id or name,
        "geometry": geo[1] if geo else None,
        "properties": {
            "datetime": datetime,
            "label:description": description,
            "label:type": "raster",
            "label:properties": None,
            "label:classes": [{"name": None, "classes": list(classes)}],
            "label:tasks": ["segmentation"],
            "label:methods": ["automated"],
        },
        "links": [
            {"rel": "root", "href": to_collection, "type": "application/json"},
            {"rel": "parent", "href": to_collection, "type": "application/json"},
            {"rel": "collection", "href": to_collection, "type": "application/json"},
            source_link,
        ],
        "assets": {MASK_ASSET: asset},
        "collection": collection_id,
    }
    if geo:
        item["bbox"] = geo[0]
    return item


def _image_type(href: str) -> str | None:
    """The media type of an input image by its name (None: unknown)."""
    ext = os.path.splitext(href)[1].lower()
    types = {".tif": "image/tiff; application=geotiff", ".png": PNG_TYPE, ".jpg": "image/jpeg"}
    return {**types, ".tiff": types[".tif"], ".jpeg": "image/jpeg"}.get(ext)


def collection(
    collection_id: str,
    items: Iterable[tuple[str, dict[str, Any]]],
    *,
    description: str,
    title: str | None = None,
) -> dict[str, Any]:
    """A collection over ``(relative href, item dict)`` pairs, to be written at the output root
    (:data:`COLLECTION_FILE`): its extent is the union of the items' bboxes (the whole world when
    none has one) and the span of their datetimes. The items are folded in one at a time: only
    their links are kept."""
    from pystac.extensions.label import LabelExtension

    links = [{"rel": "root", "href": "./" + COLLECTION_FILE, "type": "application/json"}]
    box: list[float] | None = None
    first = last = None  # (instant, stamp) of the earliest and the latest datetime
    for rel, item in items:
        links.append({"rel": "item", "href": "./" + rel, "type": "application/geo+json"})
        b = item.get("bbox")
        if b:
            box = box or list(b[:4])
            box = [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        stamp = (item.get("properties") or {}).get("datetime")
        if stamp:
            moment = (_instant(stamp), stamp)
            first = moment if first is None else min(first, moment)
            last = moment if last is None else max(last, moment)
    spatial = box or [-180.0, -90.0, 180.0, 90.0]
    temporal = [first[1], last[1]] if first and last else [None, None]
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": [LabelExtension.get_schema_uri()],
        "id": collection_id,
        "title": title or collection_id,
        "description": description,
        "license": "other",
        "extent": {"spatial": {"bbox": [spatial]}, "temporal": {"interval": [temporal]}},
        "links": links,
    }


def _instant(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
