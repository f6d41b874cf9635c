"""Models saved by segray 0.1.0 (before the move to subpackages) still load and give the same
logits: the custom layers are registered by name, not by module path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segray import inference
from segray.errors import ModelError
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


# --- a tampered card is refused when the model loads, naming the field -----------------------


def _tampered(tmp_path, **changes) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    source = LEGACY / "fcn32s"
    (folder / saving.MODEL_FILE).write_bytes((source / saving.MODEL_FILE).read_bytes())
    doc = {**json.loads((source / saving.CARD_FILE).read_text()), **changes}
    (folder / saving.CARD_FILE).write_text(json.dumps(doc))
    return str(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_classes": 5, "class_names": None},
            "num_classes 5 does not fit the model, whose 3 output channel",
        ),
        ({"num_classes": "two"}, "num_classes: Input should be a valid integer; got 'two'"),
        ({"scale": 0}, "scale: Input should be greater than 0; got 0"),
        ({"threshold": 7}, "threshold: Input should be less than or equal to 1; got 7"),
        ({"input_shape": [100000, 100000, 3]}, "input_shape sides must lie in 1..8192"),
        ({"input_shape": [-32, 32, 3]}, "input_shape sides must lie in 1..8192"),
        ({"input_shape": [64, 64, 3]}, "input_shape [64, 64] but the model takes [32, 32]"),
        ({"input_shape": [32, 32, 4]}, "input_shape has 4 band(s) but the model takes 3"),
        ({"class_names": ["a"]}, "class_names has 1 names for 3 classes"),
        ({"bands": [1, 2]}, "bands must be 3 band numbers"),
        ({"dtype": "complex64"}, "dtype must be one of ('uint8', 'uint16', 'int16', 'float32')"),
    ],
)
def test_a_tampered_card_is_refused_naming_the_field(tmp_path, changes, message):
    folder = _tampered(tmp_path, **changes)
    with pytest.raises(ModelError) as err:
        saving.load_model(folder)
    assert message in str(err.value) and "model.json" in str(err.value)
