"""The shared inference path: band checks, padding, output modes, Monte-Carlo dropout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segray import inference, models
from segray.errors import TileError
from segray.io.imagery import Tile
from segray.models.saving import ModelCard


def card(num_classes=2, channels=3, multiple=4, bands=None) -> ModelCard:
    return ModelCard(
        name="unet",
        num_classes=num_classes,
        input_shape=(32, 32, channels),
        input_multiple=multiple,
        bands=bands,
    )


def test_prepare_checks_bands_and_normalises_like_imagery():
    rgbn = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    with pytest.raises(TileError, match="has 4 band\\(s\\) but the model expects 3"):
        inference.prepare(Tile(rgbn, "t.tif"), card())
    x = inference.prepare(Tile(rgbn, "t.tif"), card(bands=(1, 2, 3)))
    np.testing.assert_array_equal(x, rgbn[..., :3].astype(np.float32) / 255)


def test_infer_pads_up_to_the_model_input_and_crops_back():
    model = models.build_model("unet", 3, (32, 32, 3), base_filters=4, depth=2)
    c = card(num_classes=3)
    x = np.random.default_rng(1).random((2, 30, 27, 3), dtype=np.float32)
    logits = inference.infer(model, x, c)
    assert logits.shape == (2, 30, 27, 3)
    padded = np.pad(x, ((0, 0), (0, 2), (0, 5), (0, 0)), mode="reflect")
    # compiled (graph) against eager: equal up to float round-off
    np.testing.assert_allclose(logits, np.asarray(model(padded))[:, :30, :27], atol=1e-5)
    with pytest.raises(ValueError, match="larger than the model input"):
        inference.infer(model, np.zeros((1, 64, 32, 3), np.float32), c)


def test_render_modes_binary_model():
    c = card()
    logits = np.array([[[[-2.0], [0.0], [0.5]]]], np.float32)  # p = 0.12, 0.5, 0.62
    assert inference.render(logits, c).tolist() == [[[0, 1, 1]]]
    assert inference.render(logits, c, "binary", threshold=0.6).tolist() == [[[0, 0, 1]]]
    # probabilities x 254: 255 is every mask's no-data value
    assert inference.render(logits, c, "probability").tolist() == [[[30, 127, 158]]]
    assert inference.render(logits, c, "probability", class_index=0).tolist() == [[[224, 127, 96]]]
    with pytest.raises(ValueError, match="output must be one of"):
        inference.render(logits, c, "softmax")


def test_render_multiclass_and_fractions():
    c = card(num_classes=3)
    logits = np.zeros((1, 1, 4, 3), np.float32)
    logits[0, 0, :, :] = [[5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]]
    mask = inference.render(logits, c)
    assert mask.tolist() == [[[0, 1, 2, 2]]]
    assert inference.render(logits, c, "binary", class_index=2).tolist() == [[[0, 0, 1, 1]]]
    assert inference.class_fractions(mask, 3) == [0.25, 0.25, 0.5]


def test_monte_carlo_dropout_gives_uncertainty_only_for_bayesian_models():
    import keras

    keras.utils.set_random_seed(0)
    opts = {"base_filters": 4, "depth": 2, "dropout_units": 2}
    c = ModelCard(name="bayesian-segnet", num_classes=3, input_shape=(32, 32, 3), input_multiple=4)
    x = np.random.default_rng(2).random((1, 32, 32, 3), dtype=np.float32)
    bayes = models.build_model("bayesian-segnet", 3, (32, 32, 3), **opts)
    models.set_monte_carlo(bayes, False)
    before = inference.infer(bayes, x, c)
    logits, entropy = inference.infer_mc(bayes, x, c, samples=8)
    assert entropy.shape == (1, 32, 32) and 0 <= entropy.min() and entropy.max() <= 1
    np.testing.assert_array_equal(inference.infer(bayes, x, c), before)  # MC off again
    plain = models.build_model("segnet", 3, (32, 32, 3), base_filters=4, depth=2)
    p_logits, p_entropy = inference.infer_mc(plain, x, c, samples=4)
    # deterministic passes: the mean of identical probabilities gives the same mask
    np.testing.assert_array_equal(
        inference.render(p_logits, c), inference.render(inference.infer(plain, x, c), c)
    )
    # sampling moves the bayesian model's mean probabilities away from the single dropout-free
    # pass; the plain model's MC mean is that pass (to float error)
    from segray import metrics

    def probs(z):
        return np.asarray(metrics.logits_to_probabilities(z))

    assert np.abs(probs(logits) - probs(before)).max() > 1e-3
    np.testing.assert_allclose(probs(p_logits), probs(inference.infer(plain, x, c)), atol=1e-5)


def test_infer_is_compiled_once_for_every_batch_size():
    """After warm-up no batch size from 1 to the maximum traces the predict function again."""
    model = models.build_model("unet", 2, (32, 32, 3), base_filters=4, depth=2)
    c = card()
    inference.warm_up(model, c, batch_size=8)
    fn = model.predict_function
    count = getattr(fn, "experimental_get_tracing_count", None)
    x = np.random.default_rng(3).random((8, 32, 32, 3), dtype=np.float32)
    whole = inference.infer(model, x, c, batch_size=8)
    traced = count() if count else 0
    for n in range(1, 8):
        np.testing.assert_allclose(inference.infer(model, x[:n], c, 8), whole[:n], atol=1e-5)
    assert model.predict_function is fn
    if count:  # the TensorFlow backend can say how often it traced
        assert count() == traced
    np.testing.assert_allclose(inference.infer(model, x, c, batch_size=3), whole, atol=1e-5)


def test_monte_carlo_samples_are_stochastic_when_compiled_and_state_is_kept():
    import keras

    keras.utils.set_random_seed(4)
    c = ModelCard(name="bayesian-segnet", num_classes=2, input_shape=(32, 32, 3), input_multiple=4)
    bayes = models.build_model(
        "bayesian-segnet", 2, (32, 32, 3), base_filters=4, depth=2, dropout_units=2
    )
    models.set_monte_carlo(bayes, True)
    x = np.random.default_rng(5).random((2, 32, 32, 3), dtype=np.float32)
    first, second = inference.infer(bayes, x, c), inference.infer(bayes, x, c)
    assert not np.allclose(first, second)  # dropout draws anew on every compiled call
    fn = bayes.predict_function
    _, entropy = inference.infer_mc(bayes, x, c, samples=3)
    assert inference.monte_carlo_enabled(bayes) and bayes.predict_function is fn  # left on
    assert entropy.shape == (2, 32, 32) and entropy.max() > 0
    models.set_monte_carlo(bayes, False)
    assert not inference.monte_carlo_enabled(bayes)
    np.testing.assert_array_equal(inference.infer(bayes, x, c), inference.infer(bayes, x, c))


def test_infer_stacks_groups_shapes_and_keeps_failures_to_their_images():
    model = models.build_model("unet", 2, (32, 32, 3), base_filters=4, depth=2)
    c = card()
    rng = np.random.default_rng(6)
    stacks = [rng.random(s, dtype=np.float32) for s in [(2, 32, 32, 3), (1, 20, 12, 3)]]
    stacks += [rng.random((3, 32, 32, 3), dtype=np.float32), np.zeros((1, 8, 8, 2), np.float32)]
    out = inference.infer_stacks(model, stacks, c, batch_size=2)
    assert [o.shape for o in out[:3]] == [(2, 32, 32, 1), (1, 20, 12, 1), (3, 32, 32, 1)]
    np.testing.assert_allclose(out[2], inference.infer(model, stacks[2], c), atol=1e-5)
    assert isinstance(out[3], Exception)  # 2 bands for a 3-band model: that image alone fails
    with_mc = inference.infer_stacks(model, stacks[:1], c, mc_samples=2)[0]
    assert with_mc.shape == (2, 32, 32, 2)  # the uncertainty rides along as the last channel
    assert 0 <= with_mc[..., -1].min() and with_mc[..., -1].max() <= 1


def test_render_outputs_share_the_threshold_and_uncertainty_is_uint8():
    c = card()
    logits = np.array([[[[-2.0], [0.0], [0.5]]]], np.float32)  # p = 0.12, 0.5, 0.62
    mask, labels = inference.render_outputs(logits, c, "probability", threshold=0.6)
    assert mask.tolist() == [[[30, 127, 158]]] and labels.tolist() == [[[0, 0, 1]]]
    same, again = inference.render_outputs(logits, c)
    assert same is again and same.tolist() == [[[0, 1, 1]]]
    entropy = np.array([0.0, 0.5, 1.0, 1.2], np.float32)
    assert inference.render_uncertainty(entropy).tolist() == [0, 127, 254, 254]


def test_mask_legend_says_what_each_kind_of_mask_holds():
    c = ModelCard(name="unet", num_classes=3, input_shape=(32, 32, 3), class_names=["bg", "a", "b"])
    classes = inference.mask_legend(c, "classes")
    assert classes["palette"] == list(inference.PALETTE[:3])
    assert json.loads(classes["tags"]["CLASS_NAMES"]) == ["bg", "a", "b"]
    binary = inference.mask_legend(c, "binary", 2)
    assert binary["palette"] == [inference.PALETTE[0], inference.PALETTE[2]]
    assert json.loads(binary["tags"]["CLASS_NAMES"]) == ["other", "b"]
    probability = inference.mask_legend(c, "probability", 1)
    assert "palette" not in probability  # a continuous value, not classes
    assert probability["tags"] == {"PROBABILITY_OF": "a", "SCALE": str(1 / 254)}


def _probabilities(logits: np.ndarray) -> np.ndarray:
    from segray import metrics

    return np.asarray(metrics.logits_to_probabilities(logits))


@pytest.mark.parametrize("classes", [2, 3])
def test_tta_averages_each_view_turned_back_and_is_equivariant(classes):
    from segray.inference import tta

    model = models.build_model("unet", classes, (32, 32, 3), base_filters=4, depth=2)
    c = card(num_classes=classes)
    x = np.random.default_rng(2).random((3, 32, 32, 3), dtype=np.float32)
    plain = inference.infer(model, x, c)
    results = {}
    for mode, views in (("flips", 4), ("d4", 8)):
        out = results[mode] = inference.infer(model, x, c, batch_size=5, tta=mode)
        assert out.shape == plain.shape and len(tta.symmetries(mode)) == views
        by_hand = np.mean(
            [
                _probabilities(tta.undo(inference.infer(model, tta.apply(x, s), c), s))
                for s in tta.symmetries(mode)
            ],
            axis=0,
        )
        np.testing.assert_allclose(_probabilities(out), by_hand, atol=1e-5)
        assert np.abs(_probabilities(out) - _probabilities(plain)).max() > 1e-3  # not symmetric
    # the d4 average does not depend on how the image lies: turned input, turned output
    for s in tta.symmetries("d4"):
        turned = inference.infer(model, np.ascontiguousarray(tta.apply(x, s)), c, tta="d4")
        np.testing.assert_allclose(turned, tta.apply(results["d4"], s), atol=1e-4)
    with pytest.raises(ValueError, match="tta: expected one of none, flips, d4"):
        inference.infer(model, x, c, tta="rot90")


def test_tta_on_windows_that_are_not_square():
    from segray.inference import tta

    flexible = models.build_model("unet", 2, (32, 32, 3), base_filters=4, depth=2)
    x = np.random.default_rng(3).random((2, 32, 20, 3), dtype=np.float32)
    out = inference.infer(flexible, x, card(), tta="d4")  # padded to a square, cropped back
    assert out.shape == (2, 32, 20, 1)
    s = (2, True)  # up-down: keeps the shape
    flipped = inference.infer(flexible, np.ascontiguousarray(tta.apply(x, s)), card(), tta="d4")
    np.testing.assert_allclose(
        _probabilities(flipped), _probabilities(tta.apply(out, s)), atol=1e-4
    )
    fixed = models.build_model("unet", 2, (32, 24, 3), base_filters=4, depth=2)
    with pytest.raises(ValueError, match="cannot turn by a quarter; use --tta flips"):
        inference.infer(fixed, x, card(), tta="d4")
    assert inference.infer(fixed, x, card(), tta="flips").shape == (2, 32, 20, 1)


def test_segmenter_checks_headers_keeps_errors_to_their_tiles_and_finishes_side_outputs():
    from segray.inference.segmenter import Segmenter
    from segray.io.grids import RasterHeader

    model = models.build_model("unet", 2, (32, 32, 3), base_filters=4, depth=2)
    c = ModelCard(name="unet", num_classes=2, input_shape=(32, 32, 3), dtype="uint8")
    segmenter = Segmenter(model, c, overlap=8, blend="crop")
    head = RasterHeader("a.tif", "tiff", 48, 40, 4, "uint8")
    with pytest.raises(TileError, match="a.tif: has 4 band\\(s\\) but the model expects 3"):
        segmenter.check(head, 1 << 20)
    segmenter.check(head, 1 << 20, bands=(1, 2, 3))  # a band selection the file has
    with pytest.raises(TileError, match="uint16 but the model was trained on uint8"):
        segmenter.check(RasterHeader("b.tif", "tiff", 48, 40, 3, "uint16"), 1 << 20)
    rng = np.random.default_rng(2)
    good = Tile(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "good.tif")
    bad = Tile(rng.integers(0, 256, (40, 48, 2), dtype=np.uint8), "bad.tif")
    first, failed = segmenter.segment([good, bad], confidence=True)
    assert isinstance(failed, TileError) and "bad.tif" in str(failed)
    # the windowed path by hand: cut with the overlap, run, stitched by the blend, rendered
    windows = segmenter.prepare(good)
    assert windows.stack.shape[0] == 4 and windows.layout.overlap == 8
    (logits,) = segmenter.run([windows.stack])
    joined = inference.tiling.join_windows(logits, windows.layout, "crop")
    np.testing.assert_array_equal(first.mask, inference.render(joined[None], c)[0])
    assert first.fractions == inference.class_fractions(first.mask, 2)
    assert first.confidence.shape == (40, 48) and first.uncertainty is None
    with pytest.raises(RuntimeError, match="no model"):
        Segmenter(None, c).run([windows.stack])
