"""Class masks to polygons with the sums a merge needs, and pieces cut by seams merged back.

:func:`trace` finds each 4-connected region of a class (``scipy.ndimage.label``, the same
connectivity as ``rasterio.features.shapes``) and traces them all in one call, pixel-exact, with
its pixel count, the sum of its class's probability (so a merged polygon's mean score is exact)
and whether it touches the edge of its block: only such pieces can continue beyond it.
:func:`merge_pieces` joins pieces of one grid that share an edge (not a corner, like the trace)
into one polygon each; :func:`finish` gives the layer's attributes in its CRS. Geometries travel
as WKB in the mask's own CRS until they are finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from affine import Affine

#: The probability scale of confidence maps (uint8 0..254, 255 no data).
CONFIDENCE_MAX = 254.0
#: Coordinates are snapped to this fraction of a pixel where pieces are joined.
SNAP_PIXELS = 1e-3


def trace(
    labels: np.ndarray,
    confidence: np.ndarray | None,
    transform: Affine | None,
    classes: Sequence[int],
    *,
    opening: int = 0,
    block: int | None = None,
) -> dict[str, list[Any]]:
    """The polygons of ``classes`` in a class-id mask as columns: ``wkb`` (the mask's CRS, or
    pixels), ``class_id``, ``pixels``, ``score_sum`` (the sum of ``confidence`` / 254 inside it),
    ``border`` (it touches the edge of the mask, or of its ``block`` when the mask is traced in
    square blocks of that many pixels: a scene's). ``opening`` (pixels) removes specks and
    spurs of each class first (a binary opening; the mask's edge is not eroded)."""
    h, w = labels.shape
    step = block or max(h, w, 1)
    columns: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    for top in range(0, h, step):
        for left in range(0, w, step):
            part = labels[top : top + step, left : left + step]
            conf = None if confidence is None else confidence[top : top + step, left : left + step]
            for key, values in _trace_block(part, conf, transform, classes, opening, top, left):
                columns[key] += values
    return columns


COLUMNS = ("wkb", "class_id", "pixels", "score_sum", "border")


def _trace_block(
    labels: np.ndarray,
    confidence: np.ndarray | None,
    transform: Affine | None,
    classes: Sequence[int],
    opening: int,
    top: int,
    left: int,
) -> list[tuple[str, list[Any]]]:
    import shapely
    from rasterio import features
    from scipy import ndimage

    regions = np.zeros(labels.shape, np.int32)
    class_of = [0]
    for c in classes:
        binary = labels == c
        if opening:
            binary = open_binary(binary, opening)
        found, n = ndimage.label(binary)
        if n:
            regions[found > 0] = found[found > 0] + (len(class_of) - 1)
            class_of += [c] * n
    count = len(class_of)
    if count == 1:
        return [(k, []) for k in COLUMNS]
    pixels = np.bincount(regions.ravel(), minlength=count)
    weights = None if confidence is None else np.minimum(confidence, CONFIDENCE_MAX).ravel()
    sums = np.bincount(regions.ravel(), weights=weights, minlength=count) / (
        CONFIDENCE_MAX if weights is not None else 1.0
    )
    edge = np.zeros(count, bool)
    edge[np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])] = True
    a, b, c0, d, e, f = _coefficients(transform, top, left)
    out: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    shapes = features.shapes(regions, mask=regions > 0, connectivity=4)
    for geom, value in shapes:
        i = int(value)
        poly = shapely.affinity.affine_transform(shapely.geometry.shape(geom), [a, b, d, e, c0, f])
        out["wkb"].append(shapely.to_wkb(poly))
        out["class_id"].append(class_of[i])
        out["pixels"].append(int(pixels[i]))
        out["score_sum"].append(float(sums[i]))
        out["border"].append(bool(edge[i]))
    return list(out.items())


def _coefficients(transform: Affine | None, top: int, left: int) -> tuple[float, ...]:
    """The affine coefficients of pixel (col, row) of a block at (top, left)."""
    from affine import Affine

    t = (transform if transform is not None else Affine.identity()) @ Affine.translation(left, top)
    return t.a, t.b, t.c, t.d, t.e, t.f


def open_binary(binary: np.ndarray, radius: int) -> np.ndarray:
    """A binary opening by a square of side ``2 * radius + 1``; the array's edge is replicated
    so that regions running off it are not eaten."""
    from scipy import ndimage

    size = 2 * radius + 1
    padded = np.pad(binary, radius, mode="edge")
    opened = ndimage.binary_opening(padded, structure=np.ones((size, size), bool))
    return opened[radius:-radius, radius:-radius]


def pixel_size(transform: Affine | None) -> float:
    """A pixel's side in the mask's units (1 without a transform)."""
    if transform is None:
        return 1.0
    return float(np.sqrt(abs(transform.a * transform.e - transform.b * transform.d))) or 1.0


def components(geoms: Sequence[Any], tolerance: float) -> list[list[int]]:
    """Groups of indices of ``geoms`` joined by shared edges (a corner is not enough), pieces
    within ``tolerance`` of each other counting as touching."""
    import shapely

    parent = list(range(len(geoms)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(geoms):
        tree = shapely.STRtree(geoms)
        left, right = tree.query(geoms, predicate="dwithin", distance=tolerance)
        for i, j in zip(left.tolist(), right.tolist(), strict=True):
            if i < j and root(i) != root(j) and shares_edge(geoms[i], geoms[j], tolerance):
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(geoms)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def shares_edge(a: Any, b: Any, tolerance: float) -> bool:
    """True when ``a`` and ``b`` share a stretch of boundary longer than ``tolerance`` once
    snapped to it (two pieces of one region across a seam), not only a point."""
    import shapely

    common = shapely.intersection(a.boundary, b.boundary, grid_size=tolerance)
    return shapely.length(common) > 10 * tolerance


def merge(geoms: Sequence[Any], tolerance: float) -> Any:
    """One polygon of pieces that share edges, snapped to ``tolerance``."""
    import shapely

    if len(geoms) == 1:
        return geoms[0]
    return shapely.union_all(geoms, grid_size=tolerance)


def finish(
    geoms: Sequence[Any], crs: str | None, to_crs: str, simplify: float
) -> tuple[list[Any], list[float]]:
    """Polygons simplified by ``simplify`` (their CRS's units), in ``to_crs``, and their areas
    in square metres on the WGS84 ellipsoid (geodesic: the same in any CRS; pixels² without
    a CRS)."""
    import shapely
    from pyproj import Geod

    array = np.asarray(geoms, dtype=object)
    if simplify > 0 and len(array):
        array = shapely.simplify(array, simplify, preserve_topology=True)
    if crs is None:
        return list(array), [float(a) for a in shapely.area(array)]
    lonlat = shapely.transform(array, _transformer(crs, "EPSG:4326"))
    geod = Geod(ellps="WGS84")
    areas = [abs(geod.geometry_area_perimeter(g)[0]) for g in lonlat]
    if to_crs == crs:
        return list(array), areas
    out = lonlat if to_crs == "EPSG:4326" else shapely.transform(array, _transformer(crs, to_crs))
    return list(shapely.orient_polygons(out)), areas


_TRANSFORMERS: dict[tuple[str, str], Any] = {}


def _transformer(source: str, target: str) -> Any:
    """Coordinates (N, 2) from ``source`` to ``target`` (x, y order), a function kept per pair."""
    fn = _TRANSFORMERS.get((source, target))
    if fn is None:
        from pyproj import Transformer

        t = Transformer.from_crs(source, target, always_xy=True)

        def fn(xy: np.ndarray) -> np.ndarray:
            x, y = t.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        _TRANSFORMERS[(source, target)] = fn
    return fn


def join_ids(edges: np.ndarray) -> dict[int, int]:
    """Union-find over id pairs: each id that takes part in one, and the root of its group."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: root(i) for i in parent}


def root_of(roots: tuple[np.ndarray, np.ndarray], i: int) -> int:
    """The root of id ``i`` in sorted ``(ids, roots)`` arrays; an id in no pair is its own."""
    ids, found = roots
    k = int(np.searchsorted(ids, i))
    return int(found[k]) if k < len(ids) and ids[k] == i else i
