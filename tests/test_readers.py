"""One RasterReader for tiles and scenes: the same header and pixels from encoded bytes, from a
local scene and from S3 by ranged reads; windows with a margin beyond the edge; reads onto
another grid; a STAC item's asset; bad bytes refused as the decode refuses them."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from segray.errors import DatasetError, TileError
from segray.io import imagery, storage
from segray.io.rasters import Window
from segray.io.readers import Grid, SceneReader, StacItemReader, TileReader
from segray.io.stac import StacInput

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


@pytest.fixture
def raster() -> tuple[np.ndarray, bytes]:
    rng = np.random.default_rng(3)
    array = rng.integers(1, 200, (70, 90, 3), dtype=np.uint8)
    array[:4, :6] = 0  # no data in a corner
    return array, imagery.encode_geotiff(array, CRS, TRANSFORM, nodata=0)


def test_a_tile_read_whole_is_the_one_decode(raster):
    array, data = raster
    with TileReader(data, "t.tif") as reader:
        head = reader.header()
        tile = reader.read(bands=(3, 1))
    decoded = imagery.decode(data, "t.tif", bands=(3, 1))
    np.testing.assert_array_equal(tile.array, decoded.array)
    np.testing.assert_array_equal(tile.valid, decoded.valid)
    assert (head.width, head.height, head.count, head.dtype) == (90, 70, 3, "uint8")
    assert head.crs == CRS and head.transform == TRANSFORM and head.nodata == 0


@pytest.mark.parametrize("where", ["bytes", "local", "s3"])
def test_a_window_with_a_margin_is_the_same_from_bytes_a_scene_and_s3(raster, where, request):
    """At the top-left corner the margin lies beyond the raster: filled, not data; the tile's
    transform places its first pixel ``margin`` pixels up and left of the window."""
    array, data = raster
    if where == "bytes":
        reader = TileReader(data, "t.tif")
    else:
        root = str(request.getfixturevalue("tmp_path"))
        endpoint = None
        if where == "s3":
            root, endpoint = (
                request.getfixturevalue("s3_prefix"),
                request.getfixturevalue("s3_endpoint"),
            )
        uri = storage.join(root, "scene.tif")
        fs = storage.filesystem(uri, endpoint)
        fs.write_bytes(uri, data)
        reader = SceneReader(uri, fs)
    with reader:
        tile = reader.read(Window(2, 3, 20, 30), bands=(2,), margin=8)
        inner = reader.read(Window(30, 40, 16, 16))
    assert tile.array.shape == (36, 46, 1)
    np.testing.assert_array_equal(tile.array[6:, 5:, 0], array[:30, :41, 1])
    assert not tile.valid[:6].any() and not tile.valid[:, :5].any()  # beyond the edge
    assert not tile.valid[6:10, 5:11].any() and tile.valid[10:, 11:].all()  # the nodata corner
    assert tile.transform == TRANSFORM @ Affine.translation(3 - 8, 2 - 8)
    np.testing.assert_array_equal(inner.array, array[30:46, 40:56])
    assert inner.valid is None and inner.crs == CRS


def test_a_read_onto_another_grid_reprojects_by_nearest(raster, tmp_path):
    """The raster's own grid shifted by whole pixels gives the shifted pixels; a grid in
    another CRS keeps the values the raster has (nearest: class ids stay ids)."""
    array, data = raster
    uri = str(tmp_path / "scene.tif")
    storage.write_bytes(uri, data)
    shifted = Grid(CRS, TRANSFORM @ Affine.translation(10, 5), 40, 30)
    with SceneReader(uri) as reader:
        moved = reader.read(bands=(1,), grid=shifted)
        mercator = Grid("EPSG:3857", _mercator_transform(), 60, 50)
        other = reader.read(bands=(1,), grid=mercator, fill=0)
    np.testing.assert_array_equal(moved.array[..., 0], array[5:35, 10:50, 0])
    assert moved.transform == shifted.transform and moved.crs == CRS
    assert set(np.unique(other.array)) <= set(np.unique(array[..., 0]))
    assert other.crs == "EPSG:3857" and other.valid is not None and other.valid.any()


def _mercator_transform() -> Affine:
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(CRS, "EPSG:3857", 500_000, 3_999_965, 500_045, 4e6)
    return Affine((right - left) / 60, 0, left, 0, -(top - bottom) / 50, top)


def test_a_png_window_beyond_its_edge_is_zero_and_not_data():
    array = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    tile = TileReader(imagery.encode_png(array), "t.png").read(Window(8, 6, 4, 4), margin=1)
    assert tile.array.shape == (6, 6, 3)
    np.testing.assert_array_equal(tile.array[:5, :5], array[7:12, 5:10])
    assert not tile.array[5].any() and not tile.valid[5].any() and tile.valid[:5, :5].all()


def test_bad_bytes_are_refused_by_the_reader_as_by_the_decode():
    whole = imagery.encode_geotiff(np.ones((64, 64, 3), np.uint8), CRS, TRANSFORM)
    garbage = b"II*\x00" + bytes(range(256)) * 4
    for data, kind in ((b"", "empty"), (b"hello", "not_image"), (garbage, "corrupt")):
        with pytest.raises(TileError, match="bad.tif") as err:
            TileReader(data, "bad.tif").header()
        assert err.value.kind == kind
    for data in (whole[: len(whole) // 2], garbage):
        with pytest.raises(TileError) as by_decode:
            imagery.decode(data, "bad.tif")
        with pytest.raises(TileError, match="bad.tif") as by_reader:
            TileReader(data, "bad.tif").read(Window(0, 0, 8, 8))
        assert by_reader.value.kind == by_decode.value.kind == "corrupt"


def test_a_stac_item_reads_its_asset_and_names_itself_when_it_has_none(raster, tmp_path):
    _, data = raster
    href = str(tmp_path / "asset.tif")
    storage.write_bytes(href, data)
    item = StacInput("item-1", str(tmp_path / "item.json"), {"image": href}, ("image",), None, None)
    with StacItemReader(item) as reader:
        assert reader.header().width == 90 and reader.uri == href
        assert reader.read(Window(0, 0, 8, 8)).array.shape == (8, 8, 3)
    with pytest.raises(DatasetError, match="item-1.*no asset 'nir'"):
        StacItemReader(item, "nir")


def test_one_factory_opens_bytes_a_scene_and_a_stac_item_to_the_same_pixels(raster, tmp_path):
    from segray.io.readers import open_reader

    _, data = raster
    href = str(tmp_path / "asset.tif")
    storage.write_bytes(href, data)
    item = StacInput("item-1", str(tmp_path / "item.json"), {"image": href}, ("image",), None, None)
    window = Window(10, 20, 16, 24)
    sources = {TileReader: data, SceneReader: href, StacItemReader: item}
    tiles = {}
    for kind, source in sources.items():
        with open_reader(source, uri="t.tif", asset="image") as reader:
            assert type(reader) is kind
            tiles[kind] = reader.read(window, bands=(2,), margin=3)
    for tile in tiles.values():
        np.testing.assert_array_equal(tile.array, tiles[TileReader].array)
        assert tile.transform == tiles[TileReader].transform
    with pytest.raises(TileError, match="request body"):
        open_reader(b"not an image", uri="request body").read()
    with pytest.raises(DatasetError, match="item-1.*no asset 'nir'"):
        open_reader(item, asset="nir")
