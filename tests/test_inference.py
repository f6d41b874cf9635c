"""The shared inference path: band checks, padding, output modes, Monte-Carlo dropout."""

from __future__ import annotations

import numpy as np
import pytest

from segray import imagery, inference, models
from segray.imagery import Tile, TileError
from segray.modelio import ModelCard


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
    np.testing.assert_array_equal(x, imagery.normalize(rgbn[..., :3]))


def test_infer_pads_up_to_the_model_input_and_crops_back():
    model = models.build_model("unet", 3, (32, 32, 3), base_filters=4, depth=2)
    c = card(num_classes=3)
    x = np.random.default_rng(1).random((2, 30, 27, 3), dtype=np.float32)
    logits = inference.infer(model, x, c)
    assert logits.shape == (2, 30, 27, 3)
    padded = np.pad(x, ((0, 0), (0, 2), (0, 5), (0, 0)), mode="reflect")
    np.testing.assert_allclose(logits, np.asarray(model(padded))[:, :30, :27], atol=1e-6)
    with pytest.raises(ValueError, match="larger than the model input"):
        inference.infer(model, np.zeros((1, 64, 32, 3), np.float32), c)


def test_render_modes_binary_model():
    c = card()
    logits = np.array([[[[-2.0], [0.0], [0.5]]]], np.float32)  # p = 0.12, 0.5, 0.62
    assert inference.render(logits, c).tolist() == [[[0, 1, 1]]]
    assert inference.render(logits, c, "binary", threshold=0.6).tolist() == [[[0, 0, 1]]]
    assert inference.render(logits, c, "probability").tolist() == [[[30, 128, 159]]]
    assert inference.render(logits, c, "probability", class_index=0).tolist() == [[[225, 128, 96]]]
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
    c = ModelCard("bayesian-segnet", 3, (32, 32, 3), input_multiple=4)
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
    # sampling spreads the bayesian model's probabilities: its masks differ from one pass
    assert not np.array_equal(inference.render(logits, c), inference.render(before, c)) or (
        entropy.mean() > 0
    )
