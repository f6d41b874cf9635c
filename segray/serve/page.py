"""What the map routes answer besides tiles: tile names, TileJSON, a point's class, the map page
and its static files (Leaflet from the XStatic-Leaflet package, a dependency: a wheel of segray
draws its map wherever it is installed; nothing is fetched from the web).
"""

from __future__ import annotations

import html
import json
import mimetypes
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response

from segray import inference
from segray.errors import ConfigError
from segray.io.maptiles import TILE_SIZE, MapTiles, tile_matrix_set
from segray.serve.http import ApiError

STATIC = Path(__file__).parent / "static"
#: Where the page asks for the map library's files (``static/vendor/leaflet/…``).
VENDOR = "vendor/leaflet/"
_TILE_NAME = re.compile(r"^(\d{1,9})(@2x)?\.png$")
#: Files the static route serves: the page's own and the map library's, nothing else.
ASSETS = (
    "map.js",
    "map.css",
    f"{VENDOR}leaflet.js",
    f"{VENDOR}leaflet.css",
    *(f"{VENDOR}images/{n}" for n in ("layers.png", "layers-2x.png", "marker-icon.png")),
)


def tile_name(name: str) -> tuple[int, int]:
    """``(y, size)`` of ``{y}.png`` (256 px) or ``{y}@2x.png`` (512 px); 400 otherwise."""
    match = _TILE_NAME.match(name)
    if not match:
        detail = f"tile name must be {{y}}.png or {{y}}@2x.png; got {name!r}"
        raise ApiError(400, "invalid request", detail)
    return int(match.group(1)), TILE_SIZE * (2 if match.group(2) else 1)


def tms_name(name: str) -> str:
    """A known tile matrix set's name; 404 naming the known ones otherwise."""
    try:
        tile_matrix_set(name)
    except ConfigError as err:
        raise ApiError(404, "not found", str(err)) from None
    return name


def check_tile(tiles: MapTiles, z: int, x: int, y: int) -> None:
    """404 for a z/x/y the tile matrix set does not have."""
    try:
        tiles.check(z, x, y)
    except ValueError as err:
        raise ApiError(404, "not found", str(err)) from None


def _prefix(request: Request) -> str:
    """Scheme, host and the app's route prefix, from the request's own URL."""
    path = request.url.path
    return str(request.base_url).rstrip("/") + path[: path.index("/v1/")]


def tilejson(
    request: Request,
    source: Any,
    layer: str,
    minzoom: int | None,
    card: Any,
    bands: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """TileJSON 3.0.0 of ``layer`` over ``source`` (its tiles read ``bands``, when given)."""
    info = source.tiles.info()
    query = f"url={quote(source.uri, safe='')}&layer={layer}"
    if bands:
        query += f"&bidx={','.join(map(str, bands))}"
    template = f"{_prefix(request)}/v1/tiles/{info.tms}/{{z}}/{{x}}/{{y}}.png?{query}"
    doc: dict[str, Any] = {
        "tilejson": "3.0.0",
        "name": f"{card.name} {card.version}: {layer}" if layer != "image" else source.uri,
        "version": "1.0.0",
        "scheme": "xyz",
        "tiles": [template],
        "minzoom": info.minzoom if minzoom is None else minzoom,
        "maxzoom": info.maxzoom,
        "bounds": list(info.bounds),
        "center": list(info.center),
    }
    if layer in ("mask", "precomputed"):
        doc["classes"] = legend(card)
    return doc


def legend(card: Any) -> list[dict[str, Any]]:
    """Each class with its colour (``#rrggbb``) as the mask layers draw it."""
    out = []
    for index, name in enumerate(card.names()):
        r, g, b = inference.PALETTE[index % len(inference.PALETTE)]
        out.append({"id": index, "name": name, "color": f"#{r:02x}{g:02x}{b:02x}"})
    return out


def point_doc(seen: Any, row: int, col: int, tile: tuple[int, int, int], card: Any) -> dict:
    """The class at one pixel of a native tile's prediction and the tile's class fractions."""
    names = card.names()
    value = int(seen.classes[row, col])
    fractions = inference.class_fractions(seen.classes, card.num_classes)
    doc = {
        "tile": list(tile),
        "pixel": [row, col],
        "class_id": None if value == inference.NODATA else value,
        "class_name": None if value == inference.NODATA else names[value],
        "probability": None
        if value == inference.NODATA
        else round(int(seen.probabilities[row, col, value]) / inference.PROBABILITY_MAX, 4),
        "fractions": {
            n: None if f != f else round(f, 4) for n, f in zip(names, fractions, strict=True)
        },
        "model": {"name": card.name, "version": card.version},
    }
    return doc


def map_page(
    url: str, tms: str, layer: str, token_required: bool, card: Any, bidx: str | None = None
) -> Response:
    """The map page over ``url`` (its tiles read bands ``bidx``, when given); 503 when the map
    library was never installed."""
    if leaflet() is None:
        detail = "the map library is not installed: pip install XStatic-Leaflet (segray needs it)"
        raise ApiError(503, "map unavailable", detail)
    settings = {
        "url": url,
        "tms": tms,
        "layer": layer,
        "bidx": bidx or None,
        "tokenRequired": token_required,
        "model": {"name": card.name, "version": card.version},
        "classes": legend(card),
    }
    text = (STATIC / "map.html").read_text()
    body = text.replace("{{settings}}", html.escape(json.dumps(settings), quote=True))
    body = body.replace("{{title}}", html.escape(f"segray: {url or 'no source'}"))
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": _CSP}
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


#: The page loads nothing from elsewhere: scripts, styles and images from this server only.
_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'"


def leaflet() -> Path | None:
    """The folder of Leaflet's files in the installed XStatic-Leaflet package; None without it."""
    try:
        from xstatic.pkg import leaflet as package
    except ImportError:
        return None
    folder = Path(package.BASE_DIR)
    return folder if (folder / "leaflet.js").is_file() else None


def asset(name: str) -> Response:
    """One of :data:`ASSETS` (404 for any other name: no path reaches another file)."""
    folder = leaflet() if name.startswith(VENDOR) else STATIC
    path = None if folder is None else folder / name.removeprefix(VENDOR)
    if name not in ASSETS or path is None or not path.is_file():
        raise ApiError(404, "not found", f"no static file {name!r}")
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"Cache-Control": "public, max-age=86400"}
    return Response(path.read_bytes(), media_type=media, headers=headers)


def segment_doc(tile: Any, masks: Any, card: Any, class_index: int | None) -> dict:
    """The JSON answer of ``/v1/segment``: shape, model, class fractions, CRS and, for a
    ``class``, its polygons (as bulk ``--footprints`` writes them), from the tile's class-id
    :class:`~segray.inference.segmenter.Masks`."""
    names = card.names()
    mask, fractions = masks.labels, masks.fractions
    doc: dict[str, Any] = {
        "shape": list(mask.shape),
        "model": {"name": card.name, "version": card.version},
        "classes": names,
        # no data pixels are in no class; a tile of no data at all has no fractions (null)
        "fractions": {n: None if f != f else f for n, f in zip(names, fractions, strict=True)},
        "crs": tile.crs if tile.georeferenced else None,
    }
    if class_index is not None:
        doc["class"] = class_index
        doc["polygons"] = inference.footprint_doc(mask, tile, class_index, names[class_index])
    return doc
