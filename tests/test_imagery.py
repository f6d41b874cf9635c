"""Imagery round trips and every kind of bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from segray.errors import TileError
from segray.io import imagery

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)


def rgb(h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_roundtrip_image_and_mask():
    image = rgb()
    tile = imagery.decode(imagery.encode_png(image), "a.png")
    assert tile.format == "png" and tile.shape == (32, 48, 3) and not tile.georeferenced
    np.testing.assert_array_equal(tile.array, image)

    mask = np.random.default_rng(1).integers(0, 5, (32, 48), dtype=np.uint8)
    palette = [(0, 0, 0), (255, 0, 0), (128, 128, 128), (0, 0, 255), (0, 255, 0)]
    data = imagery.encode_png(mask, palette=palette)
    pil = Image.open(io.BytesIO(data))
    assert pil.mode == "P" and pil.getpalette()[3:6] == [255, 0, 0]
    back = imagery.as_mask(imagery.decode(data, "m.png").array)
    np.testing.assert_array_equal(back, mask)


def test_jpeg_decodes_close_to_source():
    image = np.full((32, 32, 3), 120, np.uint8)
    tile = imagery.decode(imagery.encode_jpeg(image), "a.jpg")
    assert tile.format == "jpeg" and tile.shape == (32, 32, 3)
    assert np.abs(tile.array.astype(int) - 120).max() <= 3


def test_uint16_png_roundtrip():
    image = np.random.default_rng(2).integers(0, 65535, (16, 16), dtype=np.uint16)
    tile = imagery.decode(imagery.encode_png(image), "u16.png")
    assert tile.array.dtype == np.uint16
    np.testing.assert_array_equal(tile.array[..., 0], image)


def test_geotiff_roundtrip_keeps_georeference(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 4), dtype=np.uint8)
    data = imagery.encode_geotiff(image, CRS, TRANSFORM)
    tile = imagery.decode(data, "t.tif")
    assert tile.format == "tiff" and tile.shape == (40, 40, 4)
    assert tile.crs == CRS and tile.transform == TRANSFORM
    np.testing.assert_array_equal(tile.array, image)

    rgb_only = imagery.decode(data, "t.tif", bands=(1, 2, 3))
    np.testing.assert_array_equal(rgb_only.array, image[..., :3])
    nir_red = imagery.decode(data, "t.tif", bands=(4, 1))
    np.testing.assert_array_equal(nir_red.array, image[..., [3, 0]])

    mask = (image[..., 0] > 128).astype(np.uint8)
    mask_bytes, ext = imagery.encode_mask(mask, like=tile)
    assert ext == ".tif"
    path = tmp_path / "mask.tif"
    path.write_bytes(mask_bytes)
    with rasterio.open(path) as ds:
        assert ds.count == 1 and ds.dtypes[0] == "uint8"
        assert ds.crs.to_string() == CRS and ds.transform == TRANSFORM
        assert ds.compression is not None
        np.testing.assert_array_equal(ds.read(1), mask)


def test_mask_of_png_tile_is_png():
    tile = imagery.decode(imagery.encode_png(rgb()), "a.png")
    data, ext = imagery.encode_mask(np.zeros((32, 48), np.uint8), like=tile)
    assert ext == ".png" and imagery.sniff(data) == "png"


def _truncated_png():
    data = imagery.encode_png(rgb(64, 64))
    return data[: len(data) // 2]


def _truncated_tiff():
    data = imagery.encode_geotiff(rgb(300, 300), CRS, TRANSFORM)
    return data[: len(data) // 3]


def _float64_tiff():
    return imagery.encode_geotiff(np.zeros((8, 8), np.float64))


def _many_band_tiff():
    return imagery.encode_geotiff(np.zeros((8, 8, 20), np.uint8))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"", "empty file"),
        (lambda: b"hello, I am not an image at all", "not an image"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated"),
        (_truncated_png, "corrupt or truncated"),
        (_truncated_tiff, "corrupt or truncated TIFF"),
        (_float64_tiff, "unsupported pixel type float64"),
        (_many_band_tiff, "unsupported band count 20"),
    ],
)
def test_bad_input_names_file_and_reason(make, reason):
    with pytest.raises(TileError) as err:
        imagery.decode(make(), "s3://bucket/bad/tile_7.png")
    assert str(err.value).startswith("s3://bucket/bad/tile_7.png: ")
    assert reason in err.value.reason


def test_pixel_limit_refuses_bombs_before_decoding():
    big = imagery.encode_png(np.zeros((200, 300), np.uint8))
    with pytest.raises(TileError, match="too large: 300x200 = 60000 pixels"):
        imagery.decode(big, "big.png", max_pixels=50_000)
    big_tif = imagery.encode_geotiff(np.zeros((200, 300), np.uint8))
    with pytest.raises(TileError, match="too large"):
        imagery.decode(big_tif, "big.tif", max_pixels=50_000)


def test_band_selection_out_of_range():
    with pytest.raises(TileError, match=r"band selection \(1, 2, 5\) invalid for a 3-band"):
        imagery.decode(imagery.encode_png(rgb()), "a.png", bands=(1, 2, 5))


@pytest.mark.parametrize(
    "name, data",
    [
        ("rgb.png", imagery.encode_png(rgb(30, 50))),
        ("u16.png", imagery.encode_png(np.zeros((17, 9), np.uint16))),
        ("a.jpg", imagery.encode_jpeg(rgb(24, 40))),
        ("f32.tif", imagery.encode_geotiff(np.zeros((12, 20, 5), np.float32), CRS, TRANSFORM)),
        ("i16.tif", imagery.encode_geotiff(np.zeros((8, 8, 2), np.int16), CRS, TRANSFORM)),
    ],
)
def test_header_tells_what_decode_returns(name, data):
    head = imagery.header(data, name)
    tile = imagery.decode(data, name)
    assert (head.height, head.width, head.count) == tile.shape
    assert head.dtype == str(tile.array.dtype) and head.format == tile.format


def test_header_refuses_what_decode_refuses():
    for data, kind in (
        (b"", "empty"),
        (b"hello", "not_image"),
        (b"\x89PNG\r\n\x1a\n" + b"0" * 20, "corrupt"),
    ):
        with pytest.raises(TileError) as info:
            imagery.header(data, "x.bin")
        assert info.value.kind == kind and "x.bin" in str(info.value)


def test_geotiff_masks_are_cloud_optimized_with_overviews_that_keep_class_ids():
    mask = np.random.default_rng(4).choice(np.array([0, 4], np.uint8), (1024, 768))
    like = imagery.Tile(np.zeros((1024, 768, 3), np.uint8), "s.tif", "tiff", CRS, TRANSFORM)
    palette = [(0, 0, 0), (1, 2, 3), (9, 9, 9), (7, 7, 7), (230, 25, 75)]
    tags = {"CLASS_NAMES": '["a", "b", "c", "d", "e"]'}
    data, ext = imagery.encode_mask(mask, like=like, palette=palette, tags=tags)
    assert ext == ".tif"
    with rasterio.MemoryFile(data) as mem, mem.open() as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.colormap(1)[4] == (230, 25, 75, 255) and ds.colormap(1)[1] == (1, 2, 3, 255)
        assert ds.tags()["CLASS_NAMES"] == tags["CLASS_NAMES"]
        assert ds.block_shapes == [(256, 256)] and ds.overviews(1) == [2, 4]
        assert ds.crs.to_string() == CRS and ds.transform == TRANSFORM
        np.testing.assert_array_equal(ds.read(1), mask)
        overview = ds.read(1, out_shape=(256, 192))  # from the 4x overview: ids, never blends
        assert set(np.unique(overview)) == {0, 4}
