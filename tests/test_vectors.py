"""One vector layer per job: polygons traced per tile and scene block, merged across seams by Ray
tasks, written as GeoParquet, FlatGeobuf or GeoPackage and read back by three readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
import shapely.ops
from affine import Affine

from segray.errors import ConfigError
from segray.io import polygons

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)
SCENE, TILE = 256, 64


def blobs(size: int, seed: int) -> np.ndarray:
    """Three classes in blocky regions of every size, many of them cut by any grid of tiles."""
    rng = np.random.default_rng(seed)
    field = np.kron(rng.random((size // 8, size // 8)), np.ones((8, 8)))
    return ((field > 0.55).astype(np.uint8) + (field > 0.85)).astype(np.uint8)


def pieces_of_tiles(labels: np.ndarray, tile: int) -> list[dict]:
    out = []
    for top in range(0, labels.shape[0], tile):
        for left in range(0, labels.shape[1], tile):
            t = TRANSFORM @ Affine.translation(left, top)
            cols = polygons.trace(labels[top : top + tile, left : left + tile], None, t, [1, 2])
            out += [{k: cols[k][i] for k in cols} for i in range(len(cols["wkb"]))]
    return out


def test_pieces_cut_by_tile_seams_join_into_the_whole_masks_polygons():
    """Traced per tile and joined where pieces share an edge (never at a corner alone), a mask
    gives the same polygons as traced in one piece: count, per-polygon area, holes."""
    labels = blobs(SCENE, 0)
    whole = polygons.trace(labels, None, TRANSFORM, [1, 2])
    pieces = pieces_of_tiles(labels, TILE)
    inner = [shapely.from_wkb(p["wkb"]) for p in pieces if not p["border"]]
    joined = []
    for c in (1, 2):
        border = [shapely.from_wkb(p["wkb"]) for p in pieces if p["border"] and p["class_id"] == c]
        tolerance = 0.5 * polygons.SNAP_PIXELS
        for group in polygons.components(border, tolerance):
            joined.append(polygons.merge([border[i] for i in group], tolerance))
    got = sorted(round(g.area, 6) for g in inner + joined)
    want = sorted(round(shapely.from_wkb(w).area, 6) for w in whole["wkb"])
    assert len(pieces) > len(want) and got == want
    assert all(g.geom_type == "Polygon" for g in joined)
    # diagonal neighbours touch at a corner: two polygons, as the whole trace has them
    diagonal = np.zeros((4, 4), np.uint8)
    diagonal[1, 1] = diagonal[2, 2] = 1
    assert len(polygons.trace(diagonal, None, None, [1])["wkb"]) == 2
    a, b = shapely.box(0, 0, 1, 1), shapely.box(1, 1, 2, 2)
    assert polygons.components([a, b], 1e-3) == [[0], [1]]


def test_scores_areas_and_opening():
    """A polygon's score is the mean probability inside it; its area is geodesic square metres;
    an opening removes specks but not regions running off the mask's edge."""
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6] = 1
    labels[10, 10] = 1
    labels[:, 17:] = 1
    confidence = np.full(labels.shape, 127, np.uint8)
    confidence[2:4, 2:6] = 254
    cols = polygons.trace(labels, confidence, TRANSFORM, [1])
    by_pixels = dict(zip(cols["pixels"], cols["score_sum"], strict=True))
    assert by_pixels[16] / 16 == pytest.approx(0.75, abs=0.01) and 1 in by_pixels
    geoms, areas = polygons.finish([shapely.from_wkb(w) for w in cols["wkb"]], CRS, "EPSG:4326", 0)
    assert all(abs(x) <= 180 for g in geoms for x in g.bounds)
    assert sorted(areas)[-1] == pytest.approx(60 * 0.25, rel=0.002)  # 60 px of 0.25 m²
    opened = polygons.trace(labels, None, None, [1], opening=1)
    assert sorted(opened["pixels"]) == [16, 60] and sum(opened["border"]) == 1


def test_a_layer_must_name_a_format():
    from segray.bulk.config import PredictConfig

    with pytest.raises(ConfigError, match=r"layer\.shp must end with one of \.parquet"):
        PredictConfig(model="m", input="i", output="o", vectors="o/layer.shp")
    with pytest.raises(ConfigError, match="vectors_crs"):
        PredictConfig(model="m", input="i", output="o", vectors="o/l.fgb", vectors_crs="EPSG:0")


# --- jobs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    import keras

    from segray.models import build_model, saving

    keras.utils.set_random_seed(3)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    model = build_model("unet", 2, (TILE, TILE, 3), **options)
    card = saving.ModelCard(
        name="unet",
        num_classes=2,
        input_shape=(TILE, TILE, 3),
        options=options,
        class_names=["background", "building"],
    )
    folder = str(tmp_path_factory.mktemp("vector-model") / "model")
    saving.save_model(model, card, folder)
    return folder


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[str, str]:
    """A synthetic scene, and the same scene cut into tiles of one grid."""
    from segray.devtools import synth

    root = tmp_path_factory.mktemp("vector-scene")
    synth.write_collection(str(root), layout="scene", count=1, scene_size=SCENE, mode="binary")
    path = root / "scenes" / "scene_000.tif"
    tiles = root / "tiles"
    tiles.mkdir()
    with rasterio.open(path) as ds:
        for top in range(0, SCENE, TILE):
            for left in range(0, SCENE, TILE):
                window = rasterio.windows.Window(left, top, TILE, TILE)
                profile = {**ds.profile, "width": TILE, "height": TILE, "tiled": False}
                profile["transform"] = ds.window_transform(window)
                profile.pop("blockxsize", None), profile.pop("blockysize", None)
                with rasterio.open(tiles / f"t_{top:03d}_{left:03d}.tif", "w", **profile) as out:
                    out.write(ds.read(window=window))
    return str(path), str(tiles)


def read_layer(uri: str):
    """GeoParquet through GeoPandas (pyarrow), the other formats through pyogrio (GDAL)."""
    import geopandas
    import pyogrio

    return geopandas.read_parquet(uri) if uri.endswith(".parquet") else pyogrio.read_dataframe(uri)


def traced_whole(labels: np.ndarray, transform: Affine, crs: str) -> tuple[int, float]:
    """Polygons of both classes of a mask traced in one piece: count and geodesic area."""
    cols = polygons.trace(labels, None, transform, [0, 1])
    _, areas = polygons.finish([shapely.from_wkb(w) for w in cols["wkb"]], crs, crs, 0)
    return len(cols["wkb"]), sum(areas)


def assert_no_seam_pieces(layer) -> None:
    """No two polygons of one class share an edge: nothing sits on a seam as two pieces."""
    for _, group in layer.groupby("class_id"):
        geoms = list(group.geometry)
        assert all(len(g) == 1 for g in polygons.components(geoms, 0.5 * polygons.SNAP_PIXELS))


@pytest.mark.slow
def test_tile_and_scene_jobs_write_one_layer_merged_across_seams(
    tiny_model, scene, tmp_path, ray_local, monkeypatch
):
    """The tile job's layer has the polygons of its mosaic traced whole, the scene job's those
    of its mask (traced in blocks of 96 px); a rerun that skips every mask rebuilds the same
    layer from the parts; the layer opens in GeoPandas (pyogrio), DuckDB and pyarrow."""
    import duckdb
    import pyarrow.parquet as pq

    from segray.bulk import vectors
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict

    # several scan tasks, pair and join buckets, and cells of 48 px: groups cross all of them
    for name, value in {"PARTS_PER_TASK": 5, "PARTS_PER_BUCKET": 4, "CELL_PIXELS": 48}.items():
        monkeypatch.setattr(vectors, name, value)
    scene_path, tiles = scene
    out = tmp_path / "tiles-out"
    layer_uri = str(out / "layer.parquet")
    common = {"model": tiny_model, "vector_classes": (0, 1), "simplify": 0.0}
    tile_config = PredictConfig(
        **common, input=tiles, output=str(out), vectors=layer_uri, vectors_crs="native"
    )
    assert predict(tile_config).counts["ok"] == 16
    assert [p.name for p in (out / "_vectors").iterdir()] == ["parts"]  # staging removed
    mosaic = np.zeros((SCENE, SCENE), np.uint8)
    for path in out.glob("t_*.tif"):
        top, left = (int(v) for v in path.stem.split("_")[1:])
        with rasterio.open(path) as ds:
            mosaic[top : top + TILE, left : left + TILE] = ds.read(1)
    with rasterio.open(scene_path) as ds:
        transform, crs = ds.transform, ds.crs.to_string()
    count, area = traced_whole(mosaic, transform, crs)
    layer = read_layer(layer_uri)
    assert count > 16 and len(layer) == count
    assert layer["area_m2"].sum() == pytest.approx(area, rel=0.005)
    assert layer.crs.to_string() == crs and set(layer["class_name"]) <= {"background", "building"}
    assert layer["score"].between(0.5, 1.0).all()
    assert_no_seam_pieces(layer)
    geo = json.loads(pq.read_schema(layer_uri).metadata[b"geo"])["columns"]["geometry"]
    assert geo["crs"]["id"]["code"] == 32633 and "bbox" in geo["covering"]
    con = duckdb.connect()
    got = con.execute(f"select count(*), sum(pixels) from read_parquet('{layer_uri}')").fetchone()
    assert got == (count, SCENE * SCENE)

    # a rerun skips every mask: the layer is rebuilt from the parts of the first run
    (out / "layer.parquet").unlink()
    again = predict(tile_config)
    assert again.counts["skipped"] == 16 and len(read_layer(layer_uri)) == count

    # the scene job, traced in blocks of 96 px: its seams merge too, in WGS84 and FlatGeobuf
    scene_out = tmp_path / "scene-out"
    fgb = str(scene_out / "layer.fgb")
    scene_config = PredictConfig(
        **common,
        input=scene_path,
        output=str(scene_out),
        scene=True,
        vectors=fgb,
        vector_block=96,
    )
    assert predict(scene_config).ok
    with rasterio.open(scene_out / "scene_000.tif") as ds:
        count, area = traced_whole(ds.read(1), transform, crs)
    layer = read_layer(fgb)
    assert len(layer) == count and layer["area_m2"].sum() == pytest.approx(area, rel=0.005)
    assert layer.crs.to_epsg() == 4326 and set(layer["source"]) == {scene_path}


@pytest.mark.slow
def test_a_layer_on_s3_as_geopackage_and_a_broken_part_is_named(
    tiny_model, scene, s3_prefix, s3_endpoint, tmp_path, ray_local, caplog
):
    """Output and layer on S3 (moto over HTTP): the GeoPackage is written whole and is an asset
    of the job's STAC collection; a part that cannot be read leaves its polygons out of the
    rebuilt layer, with an error naming it, and the job goes on."""
    import json

    import pyogrio

    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.io import storage

    _, tiles = scene
    out = f"{s3_prefix}/vectors"
    gpkg = f"{out}/layer.gpkg"
    config = PredictConfig(
        model=tiny_model, input=tiles, output=out, endpoint=s3_endpoint, vectors=gpkg
    )
    assert predict(config).counts["ok"] == 16
    data = storage.read_bytes(gpkg, endpoint=s3_endpoint)
    local = tmp_path / "layer.gpkg"
    local.write_bytes(data)
    layer = pyogrio.read_dataframe(local)
    assert len(layer) > 0 and set(layer["class_id"]) == {1} and layer.crs.to_epsg() == 4326
    collection = json.loads(storage.read_bytes(f"{out}/collection.json", endpoint=s3_endpoint))
    assert collection["assets"]["vectors"]["href"] == "./layer.gpkg"

    # a part that cannot be read as Parquet: named, its polygons left out, the rest rebuilt
    fs = storage.filesystem(out, s3_endpoint)
    parts = fs.list_files(f"{out}/_vectors/parts")
    assert len(parts) == 16 and fs.list_files(f"{out}/_vectors") == parts  # staging removed
    broken = next(p for p in parts if pyarrow_rows(fs.read_bytes(p)))
    fs.write_bytes(broken, b"not parquet")
    with caplog.at_level("ERROR", logger="segray.bulk.vectors"):
        assert predict(config).counts["skipped"] == 16
    assert broken in caplog.text and "1 part(s) unreadable" in caplog.text
    local.write_bytes(storage.read_bytes(gpkg, endpoint=s3_endpoint))
    assert 0 < len(pyogrio.read_dataframe(local)) < len(layer)


def pyarrow_rows(data: bytes) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data)).num_rows


def test_object_scores_match_one_to_one_at_iou_half_and_the_cli_reports_them(tmp_path):
    """SpaceNet's metric: matches at IoU >= 0.5, one to one, labels reprojected to the layer's
    CRS; ``segray eval --vectors`` writes report.json and prints the line."""
    import pyarrow as pa
    from click.testing import CliRunner
    from pyproj import Transformer

    from segray.cli import cli
    from segray.io.vectorlayer import LayerWriter, layer_schema

    x0, y0 = 500_000.0, 4_000_000.0
    truth = [shapely.box(x0 + 20 * i, y0, x0 + 20 * i + 10, y0 + 10) for i in range(3)]
    predicted = [
        truth[0],  # IoU 1
        shapely.box(x0 + 21, y0, x0 + 31, y0 + 10),  # IoU 9/11
        shapely.box(x0 + 46, y0, x0 + 56, y0 + 10),  # IoU 4/16: no match
        shapely.box(x0 + 100, y0, x0 + 110, y0 + 10),  # nothing there
        shapely.box(x0 + 1, y0, x0 + 11, y0 + 10),  # a second one on truth[0]: not matched again
    ]
    rows = {
        "geometry": [shapely.to_wkb(g) for g in predicted],
        "class_id": [1] * 5,
        "class_name": ["building"] * 5,
        "area_m2": [100.0] * 5,
        "score": [0.9] * 5,
        "pixels": [400] * 5,
        "source": ["s"] * 5,
        "model_version": ["v"] * 5,
        "run_id": ["r"] * 5,
    }
    layer = tmp_path / "layer.parquet"
    writer = LayerWriter(str(layer), ".parquet", CRS)
    writer.write(pa.table(rows, schema=layer_schema()))
    writer.close()
    to_wgs84 = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    features = [
        {
            "type": "Feature",
            "properties": {},
            "geometry": shapely.geometry.mapping(shapely.ops.transform(to_wgs84.transform, g)),
        }
        for g in truth
    ]
    labels = tmp_path / "labels.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = CliRunner().invoke(
        cli, ["eval", "--vectors", str(layer), "--labels", str(labels), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "report.json").read_text())
    assert (doc["predicted"], doc["labels"], doc["matches"]) == (5, 3, 2)
    assert doc["precision"] == pytest.approx(0.4) and doc["recall"] == pytest.approx(2 / 3)
    assert doc["f1"] == pytest.approx(0.5) and doc["mean_match_iou"] == pytest.approx(
        (1 + 9 / 11) / 2, abs=1e-4
    )
    assert "matches 2, precision 0.400" in result.output
    missing = CliRunner().invoke(cli, ["eval", "--vectors", str(layer)])
    assert missing.exit_code != 0 and "give labels too" in missing.output
