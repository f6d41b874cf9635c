"""Vector labels in any CRS: a GeoJSON, FlatGeobuf or GeoPackage file read once (local or s3://),
its features reprojected to each scene's grid and kept in that scene's pixel coordinates with a
spatial index, so a chip rasterises only the features that meet it.

A GeoJSON file without a ``crs`` member is WGS84 (RFC 7946); other formats carry their CRS. The
class of a feature is its ``class_field`` attribute (an integer), or 1 without a field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray.errors import DatasetError
from segray.io import gdal, storage
from segray.io.files import FileSystem

VECTOR_SUFFIXES = (".geojson", ".json", ".fgb", ".gpkg")


@dataclass(frozen=True)
class Features:
    """The polygons of one vector file: shapely geometries, their class ids and their CRS."""

    source: str
    geometries: np.ndarray  # shapely geometries
    classes: np.ndarray  # uint8
    crs: str | None
    _index: list[Any] = field(default_factory=list, repr=False, compare=False)

    def near(self, left: float, bottom: float, right: float, top: float) -> np.ndarray:
        """Indices (file order) of the features meeting a rectangle in their own CRS; the
        spatial index is built on first use and kept."""
        import shapely

        if not len(self.geometries):
            return np.zeros(0, np.int64)
        if not self._index:
            self._index.append(shapely.STRtree(self.geometries))
        return np.sort(self._index[0].query(shapely.box(left, bottom, right, top)))


def read_features(
    uri: str, fs: FileSystem | None = None, *, class_field: str | None = None
) -> Features:
    """Read a vector file's polygons; :class:`DatasetError` naming the file (and the field) when
    it cannot be read, has no such field, or holds class ids outside 0–254."""
    import pyogrio.raw
    import shapely

    try:
        data = (fs or storage.filesystem(uri)).read_bytes(uri)
    except storage.StorageError as exc:
        raise DatasetError(f"{uri}: cannot read the labels: {exc}") from exc
    try:
        fields = [str(f) for f in pyogrio.read_info(data, layer=0)["fields"]]
        if class_field and class_field not in fields:
            raise DatasetError(
                f"{uri}: no field {class_field!r} for --class-field "
                f"(fields: {', '.join(fields) or 'none'})"
            )
        meta, _, wkb, values = pyogrio.raw.read(
            data, columns=[class_field] if class_field else [], layer=0
        )
    except DatasetError:
        raise
    except Exception as exc:  # pyogrio raises its own errors and GDAL's
        raise DatasetError(f"{uri}: not a vector file GDAL reads ({exc})") from exc
    geometries = shapely.from_wkb(wkb) if len(wkb) else np.array([], object)
    keep = np.array([g is not None and not g.is_empty for g in geometries], bool)
    kinds = {g.geom_type for g in geometries[keep]} - {"Polygon", "MultiPolygon"}
    if kinds:
        raise DatasetError(f"{uri}: labels must be polygons; found {', '.join(sorted(kinds))}")
    if class_field:
        raw = np.asarray(values[0])
        try:
            numbers = raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{uri}: field {class_field!r} must hold class ids ({exc})") from exc
        bad = ~np.isfinite(numbers) | (numbers < 0) | (numbers > 254) | (numbers % 1 != 0)
        if (bad & keep).any():
            first = raw[np.nonzero(bad & keep)[0][0]]
            raise DatasetError(
                f"{uri}: field {class_field!r} holds {first!r}; class ids are integers 0–254"
            )
        classes = np.where(bad, 0, numbers).astype(np.uint8)
    else:
        classes = np.ones(len(geometries), np.uint8)
    crs = meta.get("crs")
    return Features(uri, geometries[keep], classes[keep], crs)


class SceneLabels:
    """The features meeting one scene, in that scene's pixel coordinates (column, row), in file
    order (later features are burnt on top), with their boxes (n, 4) for drawing chips near them.

    After :meth:`share` a copy pickles as a reference to the geometry in Ray's object store
    (fetched once per process, with its spatial index, only where a chip of this scene is read)
    and its boxes; otherwise it pickles whole and rebuilds its index on use."""

    def __init__(self, geometries: np.ndarray, classes: np.ndarray) -> None:
        import shapely

        self.boxes = (
            shapely.bounds(geometries).reshape(-1, 4) if len(geometries) else np.zeros((0, 4))
        )
        self._parts: dict[str, Any] | None = {"geometries": geometries, "classes": classes}
        self._shared: Any = None

    def share(self) -> SceneLabels:
        """Put the geometry in Ray's object store; this copy keeps only the boxes."""
        from segray.runtime import Shared

        if self._shared is None and self._parts is not None:
            self._shared = Shared(self._parts).share(keep=False)
            self._parts = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        parts = None if self._parts is None else dict(self._parts, tree=None)
        return {"boxes": self.boxes, "_parts": parts, "_shared": self._shared}

    @property
    def parts(self) -> dict[str, Any]:
        return self._parts if self._parts is not None else self._shared.get()

    @property
    def geometries(self) -> np.ndarray:
        return self.parts["geometries"]

    @property
    def classes(self) -> np.ndarray:
        return self.parts["classes"]

    @property
    def tree(self) -> Any:
        import shapely

        parts = self.parts  # the index is kept with the geometry it indexes
        if parts.get("tree") is None:
            parts["tree"] = shapely.STRtree(parts["geometries"])
        return parts["tree"]

    def __len__(self) -> int:
        return len(self.boxes)

    def meeting(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        """Indices (file order) of the features meeting a window."""
        import shapely

        if not len(self.geometries):
            return np.zeros(0, np.int64)
        window = shapely.box(col, row, col + width, row + height)
        return np.sort(self.tree.query(window, predicate="intersects"))

    @gdal.scoped
    def rasterize(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        """Class ids (height, width) of a window: 0 where no feature is."""
        from affine import Affine
        from rasterio import features

        hits = self.meeting(col, row, width, height)
        if not hits.size:
            return np.zeros((height, width), np.uint8)
        shapes = zip(self.geometries[hits], self.classes[hits].tolist(), strict=True)
        return features.rasterize(
            shapes,
            out_shape=(height, width),
            transform=Affine.translation(col, row),
            fill=0,
            dtype="uint8",
        )


@gdal.scoped
def for_scene(features: Features, crs: Any, transform: Any, width: int, height: int) -> SceneLabels:
    """The features meeting a scene of ``width`` × ``height`` pixels on (``crs``, ``transform``),
    reprojected to it and moved to its pixel coordinates."""
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    source = CRS.from_user_input(features.crs) if features.crs else None
    target = CRS.from_user_input(crs) if crs else None
    near = _near(features, source, target, transform, width, height)
    geoms, classes = features.geometries[near], features.classes[near]
    if len(geoms) and source is not None and target is not None and source != target:

        def reproject(xy: np.ndarray) -> np.ndarray:
            xs, ys = warp(source, target, xy[:, 0], xy[:, 1])
            return np.column_stack([xs, ys])

        try:
            geoms = shapely.transform(geoms, reproject)
        except Exception as exc:  # PROJ refuses points outside its domain
            raise DatasetError(
                f"{features.source}: its labels cannot be placed on a scene in {target} "
                f"(they are in {source}; a GeoJSON without a crs member is WGS84): {exc}"
            ) from exc
    if len(geoms) and transform is not None:
        a, b, c, d, e, f, *_ = ~transform

        def to_pixels(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            return np.column_stack([a * x + b * y + c, d * x + e * y + f])

        geoms = shapely.transform(geoms, to_pixels)
    if not len(geoms):
        return SceneLabels(np.array([], object), np.zeros(0, np.uint8))
    inside = shapely.STRtree(geoms).query(shapely.box(0, 0, width, height), predicate="intersects")
    inside = np.sort(inside)
    return SceneLabels(geoms[inside], classes[inside])


def _near(
    features: Features, source: Any, target: Any, transform: Any, width: int, height: int
) -> np.ndarray:
    """The features whose boxes meet the scene's bounds taken into their CRS (edges densified),
    so that a file covering many scenes is reprojected a scene's worth at a time; all of them
    when the bounds cannot be taken there."""
    from rasterio.warp import transform_bounds

    everything = np.arange(len(features.geometries))
    if transform is None or not len(everything):
        return everything
    a, b, c, d, e, f, *_ = transform
    xs = [a * col + b * row + c for col in (0, width) for row in (0, height)]
    ys = [d * col + e * row + f for col in (0, width) for row in (0, height)]
    bounds = (min(xs), min(ys), max(xs), max(ys))
    if source is not None and target is not None and source != target:
        try:
            bounds = transform_bounds(target, source, *bounds, densify_pts=21)
        except Exception:  # PROJ outside its domain: reproject everything and let that tell
            return everything
        if not all(np.isfinite(bounds)):
            return everything
    return features.near(*bounds)
