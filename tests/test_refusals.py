"""A model refused on load is refused on the driver, before any actor or replica starts, in one
line naming the file and why: ``segray predict``, ``pool start``, ``serve`` and ``eval`` with the
probe's hostile models (a ``Lambda`` layer, an activation naming ``os.system``) and a card that
contradicts its model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from segray.devtools import synth
from segray.errors import ModelError
from segray.models import build_model, saving, vetting

SEGRAY = str(Path(sys.executable).with_name("segray"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Run folders: a working binary U-Net, the same with a Lambda layer, with an activation
    naming ``os.system``, and with a card of three classes."""
    import keras

    root = tmp_path_factory.mktemp("models")
    card = saving.ModelCard(name="unet", num_classes=2, input_shape=(32, 32, 3))
    model = build_model("unet", 2, (32, 32, 3), base_filters=4, depth=2)
    saving.save_model(model, card, str(root / "good"))
    # a Lambda layer between the U-Net and its output: Python code in the file
    shifted = keras.layers.Lambda(lambda t: t + 1.0)(model.output)
    saving.save_model(keras.Model(model.input, shifted), card, str(root / "lambda"))
    # the good file with one activation rewritten to a function of the os module
    with zipfile.ZipFile(root / "good" / "model.keras") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    conv = next(x for x in config["config"]["layers"] if x["class_name"] == "Conv2D")
    conv["config"]["activation"] = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "system",
    }
    files["config.json"] = json.dumps(config).encode()
    (root / "os").mkdir()
    with zipfile.ZipFile(root / "os" / "model.keras", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    (root / "os" / "model.json").write_text(card.to_json())
    saving.save_model(model, card.replace(num_classes=3), str(root / "three"))
    return {name: str(root / name) for name in ("good", "lambda", "os", "three")}


REASONS = {
    "lambda": "refused: layer 'lambda' is a Lambda layer: Python code",
    "os": "function 'system' from module 'os', which is neither Keras nor segray",
    "three": "num_classes 3 does not fit the model, whose 1 output channel(s) mean 2 classes",
}


def test_function_names_are_refused_only_outside_keras_and_segray():
    def conv(activation):
        return {"class_name": "Conv2D", "config": {"name": "c", "activation": activation}}

    assert list(vetting.refusals(conv("relu"))) == []
    assert list(vetting.refusals(conv("keras.activations.relu"))) == []
    (why,) = vetting.refusals(conv("os.system"))
    assert why == "layer 'c': activation 'os.system' is not a Keras function"
    custom = {"class_name": "Dense", "registered_name": "evil>Layer", "config": {"name": "d"}}
    (why,) = vetting.refusals(custom)
    assert "custom object 'evil>Layer', which segray does not define" in why


@pytest.mark.parametrize("name", list(REASONS))
def test_a_refused_model_is_one_line_on_the_driver(name, models):
    saving.vet(models["good"])  # the model they come from passes
    with pytest.raises(ModelError, match=re.escape(REASONS[name])):
        saving.vet(models[name])
    # and so does every load: an actor's or a replica's
    with pytest.raises(ModelError, match=re.escape(REASONS[name])):
        saving.load_model(models[name])


def _run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([SEGRAY, *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("name", ["lambda", "os"])
def test_predict_pool_serve_and_eval_refuse_before_anything_starts(name, models, tmp_path):
    images = tmp_path / "tiles"
    synth.write_collection(str(images), count=2, size=32, mode="binary", seed=1)
    model = models[name]
    output = f"--output={tmp_path}/masks"
    commands = {
        "predict": ["predict", f"--model={model}", f"--input={images}/images", output],
        "pool start": ["pool", "start", "p1", f"--model={model}", "--ray-address=127.0.0.1:1"],
        "serve": ["serve", f"--model={model}", "--port=1"],
        "eval": ["eval", f"--model={model}", f"--data={images}", f"--out={tmp_path}/eval"],
    }
    for what, args in commands.items():
        proc, seconds = _run(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, what
        assert len(lines) == 1 and lines[0].startswith("Error: "), (what, proc.stderr[-2000:])
        assert f"{model}/model.keras" in lines[0] and REASONS[name] in lines[0], (what, lines)
        assert "serving" not in proc.stdout and "Traceback" not in proc.stderr, what
        assert seconds < 60, (what, seconds)  # no Ray started, no actor waited for
    assert not (tmp_path / "masks").exists()  # nothing written
