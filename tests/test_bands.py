"""Per-band statistics, valid-pixel maps, the one normalisation, and no data through to outputs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from segray import inference
from segray.datasets import stats as band_stats
from segray.errors import ModelError
from segray.inference import tiling
from segray.io import bands, imagery
from segray.models.saving import ModelCard


def _stats_of(pixels: np.ndarray) -> bands.BandStats:
    sampler = band_stats.StatsSampler()
    sampler.add(*band_stats.image_summary(pixels, None, len(pixels), np.random.default_rng(0)))
    return sampler.result()


def test_each_rule_maps_pixels_as_documented():
    x = np.array([[[0, 100], [4095, 300]]], np.uint16)  # (1, 2, 2): two pixels, two bands
    np.testing.assert_allclose(bands.normalize(x, "scale"), x / 65535, rtol=1e-6)
    np.testing.assert_allclose(bands.normalize(x, "scale", scale=4095)[0, 1, 0], 1.0)
    stats = bands.BandStats(
        mean=(2000.0, 200.0),
        std=(1000.0, 100.0),
        p2=(0.0, 150.0),
        p98=(4000.0, 250.0),
        pixels=2,
        sampled=2,
    )
    np.testing.assert_allclose(bands.normalize(x, "stats", stats=stats), [[[-2, -1], [2.095, 1]]])
    np.testing.assert_allclose(bands.normalize(x, "percentile", stats=stats), [[[0, 0], [1, 1]]])
    valid = np.array([[True, False]])
    out = bands.normalize(x, "stats", stats=stats, valid=valid)
    assert out.dtype == np.float32 and out[0, 1].tolist() == [0.0, 0.0]  # no data → the mean
    with pytest.raises(ModelError, match="needs band statistics"):
        bands.normalize(x, "stats")
    with pytest.raises(ModelError, match="describe 2 band"):
        bands.normalize(x[..., :1], "stats", stats=stats)


def test_statistics_equal_numpy_over_the_valid_pixels_only():
    rng = np.random.default_rng(3)
    images = [rng.normal([3000, 800, 150], [400, 90, 20], (64, 64, 3)).astype(np.uint16)]
    images.append(rng.normal([2500, 900, 140], [300, 80, 25], (64, 64, 3)).astype(np.uint16))
    valids = [np.ones((64, 64), bool), np.ones((64, 64), bool)]
    images[1][:16] = 0  # a no-data border, excluded
    valids[1][:16] = False
    k = band_stats.sample_size(2)
    sampler = band_stats.StatsSampler()
    for image, valid in zip(images, valids, strict=True):
        sampler.add(*band_stats.image_summary(image, valid, k, rng))
    stats = sampler.result()
    pixels = np.concatenate([im[v] for im, v in zip(images, valids, strict=True)]).astype(float)
    np.testing.assert_allclose(stats.mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(0), rtol=1e-6)
    p2, p98 = np.percentile(pixels, [2, 98], axis=0)
    # percentiles come from a random sample of every pixel here (k ≥ pixels per image)
    np.testing.assert_allclose(stats.p2, p2, rtol=0.01)
    np.testing.assert_allclose(stats.p98, p98, rtol=0.01)
    assert stats.pixels == len(pixels) and min(stats.mean) > 100  # the zeros left out
    with pytest.raises(ModelError, match="no valid pixels"):
        band_stats.StatsSampler().result()


def test_sample_size_bounds_the_sample_of_any_set():
    assert band_stats.sample_size(1) == band_stats.SAMPLE_PER_IMAGE[1]
    assert band_stats.sample_size(10**7) == band_stats.SAMPLE_PER_IMAGE[0]
    assert 1000 * band_stats.sample_size(1000) <= band_stats.SAMPLE_TOTAL


def _tiff(array: np.ndarray, **profile) -> bytes:
    h, w, c = array.shape
    with rasterio.MemoryFile() as mem:
        with mem.open(
            driver="GTiff", width=w, height=h, count=c, dtype=array.dtype.name, **profile
        ) as ds:
            ds.write(np.moveaxis(array, -1, 0))
        return bytes(mem.read())


def test_decode_reads_no_data_from_the_nodata_value_and_an_alpha_band():
    array = np.full((8, 8, 2), 500, np.uint16)
    array[:2] = 0
    array[5, 5, 1] = 0  # no data in one band only: the pixel is no data
    tile = imagery.decode(_tiff(array, nodata=0), "n.tif")
    expected = np.ones((8, 8), bool)
    expected[:2] = False
    expected[5, 5] = False
    np.testing.assert_array_equal(tile.valid, expected)
    assert imagery.decode(_tiff(np.full((8, 8, 2), 5, np.uint16)), "plain.tif").valid is None
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :3, 3] = 0
    with rasterio.MemoryFile() as mem:
        with mem.open(
            driver="GTiff",
            width=8,
            height=8,
            count=4,
            dtype="uint8",
            photometric="RGB",
            alpha="YES",
        ) as ds:
            ds.write(np.moveaxis(rgba, -1, 0))
        alpha = imagery.decode(bytes(mem.read()), "a.tif", bands=(1, 2, 3))
    assert alpha.valid is not None and not alpha.valid[:, :3].any() and alpha.valid[:, 3:].all()


def test_nodata_given_by_the_user_applies_only_where_the_file_has_none():
    array = np.full((4, 4, 2), 7, np.uint16)
    array[0] = 0
    tile = bands.apply_nodata(imagery.Tile(array.copy(), "t.png"), 0)
    assert tile.valid is not None and not tile.valid[0].any() and tile.valid[1:].all()
    own = imagery.Tile(array.copy(), "t.tif", meta={"nodata": 7})
    assert bands.apply_nodata(own, 0).valid is None  # the file's own value wins


def _card(**kw) -> ModelCard:
    return ModelCard(name="unet", num_classes=3, input_shape=(16, 16, 2), **kw)


def test_cards_keep_their_rule_and_refuse_one_without_statistics():
    stats = _stats_of(np.random.default_rng(0).normal(100, 10, (50, 2)))
    card = _card(normalize="stats", stats=stats, dtype="uint16")
    again = ModelCard.from_json(card.to_json())
    assert again.stats == stats and again.normalize == "stats"
    with pytest.raises(ModelError, match="needs stats of 2 band"):
        _card(normalize="percentile")
    with pytest.raises(ModelError, match="needs stats of 2 band"):
        _card(normalize="stats", stats=_stats_of(np.ones((5, 3))))
    assert _card().normalize == "scale"  # cards written before the rule existed


def test_no_data_is_255_in_every_output_and_in_no_fraction():
    card = _card()
    logits = np.random.default_rng(0).normal(size=(6, 6, 3)).astype(np.float32)
    valid = np.ones((6, 6), bool)
    valid[:, :2] = False
    marked = inference.mark_nodata(logits, valid)[None]
    for output in ("classes", "binary", "probability"):
        mask = inference.render(marked, card, output)[0]
        assert (mask[:, :2] == inference.NODATA).all() and (mask[:, 2:] < 255).all(), output
    certain = np.zeros((1, 2, 2, 3), np.float32)
    certain[..., 1] = 50.0  # class 1 (the default class_index) beyond doubt
    probability = inference.render(certain, card, "probability")
    assert probability.max() == inference.PROBABILITY_MAX  # 255 is kept for no data
    labels = inference.render(marked, card)[0]
    fractions = inference.class_fractions(labels, 3)
    expected = np.bincount(labels[:, 2:].ravel(), minlength=3) / 24
    np.testing.assert_allclose(fractions, expected)
    assert np.isnan(inference.class_fractions(np.full((2, 2), 255, np.uint8), 3)).all()
    entropy = np.where(valid, 0.5, np.nan)
    uncertainty = inference.render_uncertainty(entropy)
    assert (uncertainty[:, :2] == 255).all() and (uncertainty[:, 2:] == 127).all()


def test_no_data_survives_windows_stitched_with_overlap():
    logits = np.random.default_rng(1).normal(size=(40, 40, 3)).astype(np.float32)
    valid = np.ones((40, 40), bool)
    valid[10:14, 20:30] = False
    marked = inference.mark_nodata(logits, valid)
    windows, layout = tiling.cut_windows(marked, (16, 16), 4)
    joined = tiling.join_windows(windows, layout, "linear")
    np.testing.assert_array_equal(np.isnan(joined).any(-1), ~valid)
