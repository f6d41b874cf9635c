"""One vector layer written a part at a time: GeoParquet 1.1 (pyarrow), FlatGeobuf or GeoPackage
(pyogrio), chosen by the URI's extension.

A :class:`LayerWriter` writes to a local file and takes Arrow tables of the layer's schema
(:func:`layer_schema`) one after another, so no process ever holds the whole layer; the caller
copies the finished file to its URI whole. GeoParquet gets its ``geo`` metadata (WKB encoding,
the CRS as PROJJSON) and a ``bbox`` covering column, so that readers can filter by extent.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from segray.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

#: Extensions of the formats a layer can be written in, and their GDAL driver (None: pyarrow).
FORMATS = {".parquet": None, ".geoparquet": None, ".fgb": "FlatGeobuf", ".gpkg": "GPKG"}
GEOPARQUET_VERSION = "1.1.0"
LAYER_NAME = "segray"


def layer_format(uri: str) -> str:
    """The extension of a layer URI that names a format, or a :class:`ConfigError` naming it."""
    for ext in FORMATS:
        if uri.lower().endswith(ext):
            return ext
    raise ConfigError(f"vectors: {uri} must end with one of {', '.join(FORMATS)}")


def layer_schema() -> pa.Schema:
    """The columns of a layer: the geometry (WKB) and its attributes."""
    import pyarrow as pa

    return pa.schema(
        [
            ("geometry", pa.binary()),
            ("class_id", pa.int16()),
            ("class_name", pa.string()),
            ("area_m2", pa.float64()),
            ("score", pa.float32()),
            ("pixels", pa.int64()),
            ("source", pa.string()),
            ("model_version", pa.string()),
            ("run_id", pa.string()),
        ]
    )


def with_bbox(table: pa.Table) -> pa.Table:
    """``table`` with the GeoParquet 1.1 ``bbox`` covering column of its geometries."""
    import pyarrow as pa
    import shapely

    bounds = shapely.bounds(shapely.from_wkb(table.column("geometry").to_numpy(False)))
    names = ("xmin", "ymin", "xmax", "ymax")
    arrays = [
        pa.array(bounds[:, i].astype("float64")) if len(table) else pa.array([], pa.float64())
        for i in range(4)
    ]
    return table.append_column("bbox", pa.StructArray.from_arrays(arrays, names=names))


class LayerWriter:
    """Tables of :func:`layer_schema` appended to a local file of the format ``ext`` names."""

    def __init__(self, path: str, ext: str, crs: str | None) -> None:
        self.path, self.ext, self.crs = path, ext, crs
        self.driver = FORMATS[ext]
        self.count = 0
        self._parquet: Any = None

    def write(self, table: pa.Table) -> None:
        if self.driver is None:
            self._write_parquet(table)
        else:
            self._write_ogr(table)
        self.count += len(table)

    def _write_parquet(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        table = with_bbox(table)
        if self._parquet is None:
            schema = table.schema.with_metadata({"geo": json.dumps(self._geo())})
            self._parquet = pq.ParquetWriter(self.path, schema, compression="zstd")
        self._parquet.write_table(table.replace_schema_metadata(self._parquet.schema.metadata))

    def _geo(self) -> dict[str, Any]:
        column: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": ["Polygon", "MultiPolygon"],
            "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
        }
        if self.crs is not None:
            from pyproj import CRS

            column["crs"] = CRS.from_user_input(self.crs).to_json_dict()
        else:
            column["crs"] = None
        return {
            "version": GEOPARQUET_VERSION,
            "primary_column": "geometry",
            "columns": {"geometry": column},
        }

    def _write_ogr(self, table: pa.Table) -> None:
        import pyogrio

        pyogrio.write_arrow(
            table,
            self.path,
            layer=LAYER_NAME,
            driver=self.driver,
            geometry_name="geometry",
            geometry_type="Unknown",
            crs=self.crs,
            append=self.count > 0 or self._opened,
        )
        self._opened = True

    _opened = False

    def close(self) -> None:
        """Finish the file (an empty layer too)."""
        if self.driver is None:
            if self._parquet is None:
                import pyarrow as pa

                self._write_parquet(layer_schema().empty_table())
            self._parquet.close()
        elif not self._opened:
            import pyarrow as pa

            self._write_ogr(pa.Table.from_pylist([], schema=layer_schema()))
