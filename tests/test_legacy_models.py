"""Models saved by segray 0.1.0 (before the move to subpackages) still load and give the same
logits: the custom layers are registered by name, not by module path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segray import inference
from segray.models import saving

LEGACY = Path(__file__).parent / "data" / "legacy_models"


@pytest.mark.parametrize("name", ["bayesian-segnet", "fcn32s"])
def test_model_saved_by_the_flat_layout_loads_and_predicts_the_same(name):
    folder = LEGACY / name
    model, card = saving.load_model(str(folder))
    assert (card.name, card.num_classes, card.input_shape) == (name, 3, (32, 32, 3))
    x = np.load(folder / "input.npy")
    expected = np.load(folder / "logits.npy")
    np.testing.assert_allclose(inference.infer(model, x, card), expected, rtol=1e-5, atol=1e-5)
