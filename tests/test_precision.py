"""--precision: bf16/fp16 mixed precision in training and inference, recorded in the model card."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio

from segray import inference
from segray.bulk.config import PredictConfig
from segray.bulk.job import predict
from segray.devtools import synth
from segray.io import storage
from segray.models import build_model, saving
from segray.models.precision import model_precision, with_precision
from segray.train.augment import AugmentConfig
from segray.train.config import TrainConfig
from segray.train.driver import train


@pytest.mark.parametrize("name", ["unet", "deeplabv3plus", "unet-mobilenetv2"])
def test_a_model_rebuilt_in_bf16_keeps_its_weights_and_float32_logits(name):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model(name, 3, (64, 64, 3))
    x = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    ref = np.asarray(model.predict_on_batch(x))
    low = with_precision(model, "bf16")
    assert model_precision(model) == "fp32" and model_precision(low) == "bf16"
    computes = {layer.compute_dtype for layer in low._flatten_layers() if layer.weights}
    assert "bfloat16" in computes
    assert all(v.dtype == "float32" for v in low.weights)  # mixed: float32 variables
    out = np.asarray(low.predict_on_batch(x))
    assert out.dtype == np.float32  # the logits layers stay float32
    diff = np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert 0 < diff < 0.05, diff  # computed in bfloat16 (not exact), and close
    back = with_precision(low, "fp32")
    np.testing.assert_allclose(np.asarray(back.predict_on_batch(x)), ref, atol=1e-5)
    assert with_precision(low, "bf16") is low


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("precision-tiles"))
    synth.write_collection(root, count=24, size=32, mode="binary", seed=5)
    return root


def config(data: str, out: str, precision: str, epochs: int) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=out,
        model_options={"base_filters": 8, "depth": 2},
        num_classes=2,
        size=32,
        epochs=epochs,
        batch_size=4,
        workers=1,
        learning_rate=3e-3,
        max_failures=0,
        precision=precision,
        augment=AugmentConfig.off(),
    )


def masks(folder) -> dict[str, np.ndarray]:
    found = {}
    for path in storage.list_files(str(folder), suffixes=(".png",)):
        if "/_manifest/" in path:
            continue
        with rasterio.open(path) as ds:
            found[path.rsplit("/", 1)[-1]] = ds.read(1)
    return found


@pytest.mark.slow
def test_training_in_bf16_is_recorded_and_inference_runs_in_it_unless_told(
    tiles, tmp_path, ray_local
):
    out = str(tmp_path / "bf16")
    result = train(config(tiles, out, "bf16", epochs=3))
    assert all(math.isfinite(row["loss"]) for row in result.history)
    card = saving.load_card(out)
    assert card.precision == "bf16"
    model, card = inference.load(out)
    assert model_precision(model) == "bf16"  # the card's precision by default
    model32, _ = inference.load(out, precision="fp32")
    assert model_precision(model32) == "fp32"
    # a bulk job in the card's precision and one told fp32 agree on the masks
    images = f"{tiles}/images"
    for name, precision in (("as-trained", None), ("fp32", "fp32")):
        predict(
            PredictConfig(model=out, input=images, output=str(tmp_path / name), precision=precision)
        )
    low, full = masks(tmp_path / "as-trained"), masks(tmp_path / "fp32")
    assert low.keys() == full.keys() and len(low) == 24
    agree = np.mean([np.mean(low[k] == full[k]) for k in low])
    assert agree >= 0.99, agree


@pytest.mark.slow
def test_training_in_fp16_scales_the_loss_and_stays_finite(tiles, tmp_path, ray_local):
    out = str(tmp_path / "fp16")
    result = train(config(tiles, out, "fp16", epochs=2))
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5
    assert saving.load_card(out).precision == "fp16"
    model, _ = inference.load(out)
    assert model_precision(model) == "fp16"
