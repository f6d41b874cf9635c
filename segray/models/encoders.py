"""The backbone table: keras.applications encoders, their feature layers and preprocessing.

Adding an encoder is one row of BACKBONES; the registry derives `unet-NAME` and the `encoder=`
choices from it. The table itself needs no keras; `build_backbone` imports it when called.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
        {"alpha": (1.0, _ALPHAS)},
    ),
    "densenet121": Backbone(
        "DenseNet121",
        ("relu", "pool4_relu", "pool3_relu", "pool2_relu", "conv1_relu"),
        (32, 16, 8, 4, 2),
        "pixels 0..255 scaled to [0, 1] then ImageNet mean/std per RGB channel"
        " (keras.applications.densenet.preprocess_input)",
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
    **options: Any,
) -> keras.Model:
    """Construct the keras.applications model without its classifier top.

    `weights` ("imagenet" or a file) goes straight to the constructor, which downloads it.
    """
    import keras

    row = BACKBONES[backbone]
    constructor = getattr(keras.applications, row.constructor)
    with warnings.catch_warnings():
        # Multispectral input (1 or 4+ bands) is intended here; keras warns about it.
        warnings.filterwarnings("ignore", message="This model usually expects")
        model = constructor(
            include_top=False, weights=weights, input_shape=tuple(input_shape), **options
        )
    if freeze:
        for layer in model.layers:
            layer.trainable = False
    return model


def encoder_features(model: keras.Model, backbone: str) -> list[keras.KerasTensor]:
    """The symbolic feature tensors of a built backbone, deep -> shallow."""
    return [model.get_layer(name).output for name in BACKBONES[backbone].features]
