"""The backbone table: keras.applications encoders, their feature layers and preprocessing.

Adding an encoder is one row of BACKBONES; the registry derives `unet-NAME` and the `encoder=`
choices from it. The table itself needs no keras; `build_backbone` imports it when called.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segray.errors import ModelError

if TYPE_CHECKING:
    import keras

_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


@dataclass(frozen=True)
class Backbone:
    """One keras.applications encoder.

    `features` are layer names ordered deep -> shallow: the first is the encoder output, the
    rest are the skip connections; `strides` gives each one's downsampling factor. `options`
    are constructor arguments exposed as model options: name -> (default, allowed values).
    """

    constructor: str  # attribute of keras.applications
    features: tuple[str, ...]
    strides: tuple[int, ...]
    preprocessing: str
    mode: str  # segray.models.layers.BackbonePreprocess mode: what preprocessing amounts to
    options: Mapping[str, tuple[Any, tuple]] = field(default_factory=dict)


BACKBONES: dict[str, Backbone] = {
    # Skips of TensorFlow's image segmentation tutorial (pix2pix decoder on MobileNetV2).
    "mobilenetv2": Backbone(
        "MobileNetV2",
        (
            "block_16_project",
            "block_13_expand_relu",
            "block_6_expand_relu",
            "block_3_expand_relu",
            "block_1_expand_relu",
        ),
        (32, 16, 8, 4, 2),
        "pixels 0..255 scaled to [-1, 1] (keras.applications.mobilenet_v2.preprocess_input)",
        "tf",
        {"alpha": (1.0, _ALPHAS)},
    ),
    "densenet121": Backbone(
        "DenseNet121",
        ("relu", "pool4_relu", "pool3_relu", "pool2_relu", "conv1_relu"),
        (32, 16, 8, 4, 2),
        "pixels 0..255 scaled to [0, 1] then ImageNet mean/std per RGB channel"
        " (keras.applications.densenet.preprocess_input)",
        "torch",
    ),
    "resnet50": Backbone(
        "ResNet50",
        (
            "conv5_block3_out",
            "conv4_block6_out",
            "conv3_block4_out",
            "conv2_block3_out",
            "conv1_relu",
        ),
        (32, 16, 8, 4, 2),
        "pixels 0..255, RGB -> BGR, ImageNet mean subtracted (caffe mode,"
        " keras.applications.resnet50.preprocess_input)",
        "caffe",
    ),
    "efficientnetb0": Backbone(
        "EfficientNetB0",
        (
            "top_activation",
            "block6a_expand_activation",
            "block4a_expand_activation",
            "block3a_expand_activation",
            "block2a_expand_activation",
        ),
        (32, 16, 8, 4, 2),
        "pixels 0..255 as they are: the model rescales and normalises inside",
        "raw",
    ),
}


def feature_layer(backbone: str, stride: int) -> str:
    """Name of the feature layer of `backbone` at downsampling factor `stride`."""
    row = BACKBONES[backbone]
    return row.features[row.strides.index(stride)]


def build_backbone(
    backbone: str,
    input_shape: tuple[int, int, int],
    weights: str | None = None,
    freeze: bool = False,
    input_range: str = "unit",
    **options: Any,
) -> keras.Model:
    """The keras.applications model without its classifier top, behind its preprocessing.

    The model's input is segray's (``input_range``: unit pixels or standardised bands); a
    :class:`~segray.models.layers.BackbonePreprocess` layer inside turns it into what the backbone
    was trained on, so every path that loads the saved model feeds it right. ``weights``
    ("imagenet", downloaded by keras, or a weights file of the 3-band backbone) are loaded into a
    3-band copy and carried over; with N ≠ 3 bands the first convolution's RGB kernels are
    repeated across the bands and scaled by 3/N (as timm and segmentation_models_pytorch adapt
    pretrained stems), so multispectral input keeps the pretrained features.
    """
    import keras

    from segray.models.layers import BackbonePreprocess

    row = BACKBONES[backbone]
    constructor = getattr(keras.applications, row.constructor)
    inputs = keras.Input(tuple(input_shape), name="image")
    x = BackbonePreprocess(row.mode, input_range, name="backbone_preprocess")(inputs)
    bands = int(input_shape[-1])
    direct = weights if row.mode == "raw" else None  # rescales inside: no copy can reproduce it
    if weights is not None and row.mode == "raw" and bands != 3:
        raise ModelError(
            f"{backbone} rescales its input inside, so its pretrained weights cannot be adapted to "
            f"{bands} bands; use another encoder or weights=None"
        )
    with warnings.catch_warnings():
        # Multispectral input (1 or 4+ bands) is intended here; keras warns about it.
        warnings.filterwarnings("ignore", message="This model usually expects")
        model = constructor(include_top=False, weights=direct, input_tensor=x, **options)
        if weights is not None and direct is None:
            shape = (*tuple(input_shape)[:2], 3)
            source = constructor(include_top=False, weights=weights, input_shape=shape, **options)
            adapt_weights(source, model)
    if freeze:
        for layer in model.layers:
            layer.trainable = False
    return model


def adapt_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy the weights of a 3-band backbone into the same backbone of any band count, layer by
    layer in order: a kernel whose input axis differs (the first convolution) takes the RGB
    kernel of band i mod 3, scaled by 3/N; everything else is copied as it is."""
    weighted = [[layer for layer in m.layers if layer.weights] for m in (source, target)]
    if len(weighted[0]) != len(weighted[1]):
        raise ModelError(f"cannot carry weights of {source.name} over: the layers differ")
    for src, dst in zip(*weighted, strict=True):
        values = []
        for value, like in zip(src.get_weights(), dst.get_weights(), strict=True):
            if value.shape != like.shape:
                bands = like.shape[-2]
                value = value[..., [i % 3 for i in range(bands)], :] * (3.0 / bands)
            values.append(value)
        dst.set_weights(values)


def encoder_features(model: keras.Model, backbone: str) -> list[keras.KerasTensor]:
    """The symbolic feature tensors of a built backbone, deep -> shallow."""
    return [model.get_layer(name).output for name in BACKBONES[backbone].features]
