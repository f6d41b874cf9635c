"""Tests of the model zoo: every registered model builds, saves, loads and trains (tiny sizes)."""

import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from segray.models import (
    ModelError,
    build_model,
    count_params,
    custom_objects,
    describe_models,
    list_models,
    load_keras,
    model_info,
    output_channels,
    set_monte_carlo,
    vetting,
)
from segray.models.encoders import BACKBONES
from segray.models.saving import ModelCard

# Small values for whichever of these options a model has; tuples are filled to the default's
# length, so a newly registered model gets a tiny configuration without editing this table.
TINY = {
    "base_filters": 4,
    "backbone_filters": 4,
    "blocks_per_stage": 1,
    "fc_filters": 8,
    "aspp_filters": 8,
    "low_level_filters": 4,
    "decoder_filters": 8,
    "alpha": 0.35,
}
# Two heights, two widths, and 1, 3 and 4 bands; all divisible by 32.
SHAPES = [(32, 32, 1), (64, 32, 3), (64, 64, 4)]
ENCODER_MODELS = [name for name in list_models() if model_info(name)["encoder"]]
# Every model without a keras.applications encoder, and the lightest one with.
LIGHT_MODELS = [name for name in list_models() if name not in ENCODER_MODELS] + ENCODER_MODELS[:1]


def tiny_options(name, encoder=None, **extra):
    allowed = model_info(name, encoder)["options"]
    options = {}
    for key, value in TINY.items():
        if key in allowed:
            default = allowed[key]["default"]
            options[key] = tuple(value for _ in default) if isinstance(default, tuple) else value
    return {**options, **extra}


def tiny_model(name, num_classes=3, shape=(32, 32, 3), encoder=None, **extra):
    options = tiny_options(name, encoder, **extra)
    return build_model(name, num_classes, shape, encoder=encoder, **options)


def batch(shape, size=2, seed=0):
    return np.random.default_rng(seed).normal(size=(size, *shape)).astype("float32")


def perturb(model, seed=1):
    """Move trainable weights off their initial values (some start at zero, e.g. FCN scores)."""
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(weight + rng.normal(0, 0.05, weight.shape).astype("float32"))


# --- registry --------------------------------------------------------------------------------


def test_registry_lists_every_family():
    names = list_models()
    for name in ["unet", "fcn8s", "fcn16s", "fcn32s", "segnet", "bayesian-segnet"]:
        assert name in names
    for name in ["deeplabv3", "deeplabv3plus"]:
        assert name in names
    assert {f"unet-{b}" for b in BACKBONES} <= set(names)
    assert BACKBONES["mobilenetv2"].features[-1] == "block_1_expand_relu"


@pytest.mark.parametrize("name", list_models())
def test_model_info_describes_every_model(name):
    info = model_info(name)
    expected = {"name", "family", "output_stride", "supports_pretrained", "description", "options"}
    assert expected <= set(info)
    assert info["name"] == name and info["output_stride"] in (16, 32)
    assert all({"default", "allowed"} <= set(o) for o in info["options"].values())


def test_output_channels_binary_is_one_logit():
    assert output_channels(2) == 1
    assert output_channels(5) == 5
    with pytest.raises(ModelError, match="including background"):
        output_channels(1)


def test_importing_segray_models_is_cheap_and_load_model_registers_layers(tmp_path):
    path = tmp_path / "bayes.keras"
    tiny_model("bayesian-segnet").save(path)
    script = (
        "import sys, segray.models as m\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "assert len(m.list_models()) > 5 and m.model_info('unet')['output_stride'] == 16\n"
        f"print(m.load_keras({str(path)!r}).name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("bayesian-segnet")


# --- building --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_at_two_sizes_and_any_band_count(name):
    for shape, num_classes in zip(SHAPES, [3, 3, 2], strict=True):
        model = tiny_model(name, num_classes, shape)
        out = model(batch(shape), training=False)
        assert tuple(out.shape) == (2, *shape[:2], output_channels(num_classes))
        assert model.output_shape == (None, *shape[:2], output_channels(num_classes))
    encoder = model_info(name)["encoder"]
    if encoder:  # the table's strides are those of the layers it names
        row = BACKBONES[encoder]
        for layer, stride in zip(row.features, row.strides, strict=True):
            assert model.get_layer(layer).output.shape[1] == shape[0] // stride


def test_classic_unet_has_the_tutorial_parameter_count():
    assert count_params("unet", 2, (128, 128, 3)) == 1_941_105


def test_unet_bilinear_upsampling_and_options():
    model = tiny_model("unet", 2, (32, 32, 3), upsampling="bilinear", batch_norm=True, depth=3)
    assert model.get_layer("decoder_stage0_up_resize").interpolation == "bilinear"
    assert model.get_layer("decoder_stage0a_bn") is not None
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    no_dropout = tiny_model("unet", 2, (32, 32, 3), dropout=0)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in no_dropout.layers)


def test_unet_with_encoder_argument_is_the_named_encoder_unet():
    by_name = tiny_model("unet-mobilenetv2")
    by_argument = tiny_model("unet", encoder="mobilenetv2")
    assert by_argument.name == by_name.name == "unet-mobilenetv2"
    assert by_argument.count_params() == by_name.count_params()
    assert by_name.get_layer("decoder_stage0a_conv") is not None


def test_deeplab_takes_an_encoder_and_output_stride_8():
    model = tiny_model("deeplabv3plus", 2, (32, 32, 3), encoder="mobilenetv2")
    assert model.output_shape == (None, 32, 32, 1)
    model = tiny_model("deeplabv3", 3, (16, 24, 4), output_stride=8)
    assert model.output_shape == (None, 16, 24, 3)
    assert model.get_layer("aspp_rate12_conv").dilation_rate == (12, 12)
    with pytest.raises(ModelError, match=r"output_stride must be one of \(16,\)"):
        tiny_model("deeplabv3", 3, (32, 32, 3), encoder="mobilenetv2", output_stride=8)


def test_imagenet_weights_are_forwarded_to_keras_applications(monkeypatch):
    seen = {}
    real = keras.applications.MobileNetV2

    def fake(**kwargs):  # records the arguments and builds without downloading
        if kwargs["weights"] is not None:
            seen.update(kwargs)
        return real(**{**kwargs, "weights": None})

    monkeypatch.setattr(keras.applications, "MobileNetV2", fake)
    model = tiny_model("unet-mobilenetv2", weights="imagenet", freeze_encoder=True)
    # the pretrained 3-band copy whose weights are carried over
    assert seen["weights"] == "imagenet" and seen["alpha"] == 0.35
    assert seen["input_shape"] == (32, 32, 3)
    assert not model.get_layer("block_1_expand").trainable
    assert model.get_layer("decoder_stage0a_conv").trainable


def test_describe_models_reports_params_or_why_not():
    rows = {row["name"]: row for row in describe_models(2, (16, 16, 3))}
    assert set(rows) == set(list_models())
    assert rows["unet"]["params"] > 0 and rows["unet"]["error"] is None
    assert rows["fcn8s"]["params"] is None and "divisible" in rows["fcn8s"]["error"]


# --- save, load, train -----------------------------------------------------------------------


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_save_and_load_in_safe_mode_gives_identical_outputs(name, tmp_path):
    model = tiny_model(name)
    set_monte_carlo(model, False)
    perturb(model)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = batch((32, 32, 3))
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected, atol=1e-6)
    assert np.abs(expected).max() > 0
    # what loads in safe mode passes the driver's vetting of the file, its card fitting it
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert list(vetting.refusals(config)) == []
    assert vetting.SEGRAY_OBJECTS == set(custom_objects())
    card = ModelCard(name=name, num_classes=3, input_shape=(32, 32, 3))
    vetting.check_card(config, card, "model.json")
    with pytest.raises(ModelError, match="num_classes 4 does not fit the model"):
        vetting.check_card(config, card.replace(num_classes=4), "model.json")
    with pytest.raises(ModelError, match="input_shape has 4 band"):
        vetting.check_card(config, card.replace(input_shape=(32, 32, 4)), "model.json")


def test_deeplab_with_encoder_saves_and_loads(tmp_path):
    model = tiny_model("deeplabv3plus", encoder="mobilenetv2")
    model.save(tmp_path / "m.keras")
    loaded = load_keras(tmp_path / "m.keras")
    x = batch((32, 32, 3))
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


def test_bayesian_segnet_samples_and_segnet_does_not(tmp_path):
    x = batch((32, 32, 3))
    bayes = tiny_model("bayesian-segnet")
    perturb(bayes)
    assert not np.allclose(bayes(x), bayes(x))
    assert set_monte_carlo(bayes, False) == 6
    np.testing.assert_array_equal(bayes(x), bayes(x))
    set_monte_carlo(bayes, True)
    bayes.save(tmp_path / "bayes.keras")
    loaded = keras.saving.load_model(tmp_path / "bayes.keras", safe_mode=True)
    assert not np.allclose(loaded(x), loaded(x))
    segnet = tiny_model("segnet")
    np.testing.assert_array_equal(segnet(x), segnet(x))


def test_segnet_unpools_to_the_max_positions():
    from segray.models import MaxUnpooling2D

    reference = np.array([[1, 5, 0, 0], [2, 3, 0, 7], [9, 0, 1, 1], [0, 0, 4, 1]], "float32")
    pooled = np.array([[10, 20], [30, 40]], "float32")
    out = MaxUnpooling2D()([pooled[None, :, :, None], reference[None, :, :, None]])
    expected = [[0, 10, 0, 0], [0, 0, 0, 20], [30, 0, 0, 0], [0, 0, 40, 0]]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out)[0, :, :, 0], expected)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_one_adam_step_lowers_the_loss(name):
    # Seeded: with a few filters, max pooling/unpooling switches can flip on a rare init.
    keras.utils.set_random_seed(0)
    options = {"dropout": 0.0} if "dropout" in model_info(name)["options"] else {}
    model = tiny_model(name, 3, (32, 32, 3), **options)
    perturb(model)
    x = batch((32, 32, 3), size=4)
    y = np.random.default_rng(2).integers(0, 3, size=(4, 32, 32))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn, run_eagerly=True)
    # Training-mode batch-norm statistics on both sides, so only the weights differ.
    before = float(loss_fn(y, model(x, training=True)))
    model.train_on_batch(x, y)
    after = float(loss_fn(y, model(x, training=True)))
    assert after < before


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: build_model("unet3000", 2), ["unknown model 'unet3000'", "unet", "deeplabv3"]),
        (lambda: build_model("unet", 2, (100, 128, 3)), ["height 100", "stride 16", "96 or 112"]),
        (lambda: build_model("fcn8s", 2, (64, 70, 3)), ["width 70", "stride 32", "64 or 96"]),
        (
            lambda: build_model("unet-efficientnetb0", 2, (64, 64, 4), weights="imagenet"),
            ["cannot be adapted to 4 bands"],
        ),
        (
            lambda: build_model("unet", 2, upsampling="nearest"),
            ["upsampling must be one of ('transpose', 'bilinear'); got 'nearest'"],
        ),
        (lambda: build_model("segnet", 2, colour="red"), ["unknown option 'colour'", "depth"]),
        (lambda: build_model("unet", 1), ["num_classes", ">= 2"]),
        (lambda: build_model("segnet", 2, weights="imagenet"), ["no pretrained weights"]),
        (lambda: build_model("fcn8s", 2, encoder="resnet50"), ["takes no encoder"]),
        (lambda: build_model("unet", 2, encoder="vgg99"), ["encoder must be one of", "resnet50"]),
        (lambda: build_model("unet", 2, depth=9), ["depth must be an integer in [1, 6]"]),
        (lambda: build_model("unet", 2, dropout=(0.1, 0.2)), ["dropout needs 5 rates"]),
        (lambda: build_model("unet-mobilenetv2", 2, alpha=2), ["alpha must be one of"]),
    ],
)
def test_errors_say_what_is_allowed(call, words):
    with pytest.raises(ModelError) as raised:
        call()
    for word in words:
        assert word in str(raised.value)


# --- pretrained backbones fed what they expect ----------------------------------------------

PREPROCESS = {
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "densenet121": keras.applications.densenet.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
}


def _reference(encoder: str, tmp_path, options: dict) -> tuple[keras.Model, str]:
    """keras.applications' own backbone with random weights, saved as the weights file segray
    loads in place of "imagenet" (unreachable here): identical weights on both sides."""
    row = BACKBONES[encoder]
    constructor = getattr(keras.applications, row.constructor)
    reference = constructor(include_top=False, weights=None, input_shape=(32, 32, 3), **options)
    rng = np.random.default_rng(1)
    for layer in reference.layers:  # batch-norm statistics too, so they are carried over
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, var = layer.moving_mean, layer.moving_variance
            mean.assign(rng.normal(0, 0.1, mean.shape).astype("float32"))
            var.assign(rng.uniform(0.5, 2.0, var.shape).astype("float32"))
    path = str(tmp_path / f"{encoder}.weights.h5")
    reference.save_weights(path)
    return reference, path


def _features(model: keras.Model, layer: str, x: np.ndarray) -> np.ndarray:
    probe = keras.Model(model.inputs[0], model.get_layer(layer).output)
    return keras.ops.convert_to_numpy(probe(x, training=False))


@pytest.mark.slow
@pytest.mark.parametrize("encoder", list(PREPROCESS))
def test_backbone_inside_segray_sees_what_keras_applications_feeds_it(encoder, tmp_path):
    options = {"alpha": 0.35} if encoder == "mobilenetv2" else {}
    reference, path = _reference(encoder, tmp_path, options)
    model = build_model(f"unet-{encoder}", 2, (32, 32, 3), weights=path, **options)
    image = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    for layer in BACKBONES[encoder].features[::2]:  # the deepest, and two skips
        ours = _features(model, layer, image / 255.0)  # segray's input: pixels / 255
        theirs = _features(reference, layer, PREPROCESS[encoder](image.copy()))
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


@pytest.mark.slow
def test_multispectral_input_keeps_pretrained_features(tmp_path):
    reference, path = _reference("mobilenetv2", tmp_path, {"alpha": 0.35})
    six = build_model("unet-mobilenetv2", 2, (32, 32, 6), weights=path, alpha=0.35)
    rgb_kernel = keras.ops.convert_to_numpy(reference.get_layer("Conv1").kernel)
    kernel = keras.ops.convert_to_numpy(six.get_layer("Conv1").kernel)
    np.testing.assert_allclose(kernel, rgb_kernel[:, :, [0, 1, 2, 0, 1, 2], :] * 0.5, rtol=1e-6)
    # six bands that repeat RGB see exactly what the RGB backbone sees
    image = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    layer = BACKBONES["mobilenetv2"].features[0]
    ours = _features(six, layer, np.concatenate([image, image], axis=-1) / 255.0)
    theirs = _features(reference, layer, PREPROCESS["mobilenetv2"](image.copy()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


def test_standardised_input_maps_onto_imagenet_statistics():
    from segray.models.layers import BackbonePreprocess

    x = np.random.default_rng(3).normal(size=(1, 4, 4, 5)).astype("float32")
    torch_like = BackbonePreprocess("torch", "standard")(x)  # ImageNet-standardised already
    np.testing.assert_allclose(keras.ops.convert_to_numpy(torch_like), x, rtol=1e-5, atol=1e-5)
    unit = BackbonePreprocess("tf", "unit")(np.full((1, 2, 2, 3), 0.5, "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit), 0.0, atol=1e-6)
    model = tiny_model("unet-mobilenetv2", 2, (32, 32, 4), input_range="standard")
    assert model.get_layer("backbone_preprocess").input_range == "standard"
