"""Building blocks shared by the model families: convolution units, decoder stages, heads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import layers

from segray.models.options import output_channels

# --- graph pieces --------------------------------------------------------------------------


def conv_bn_act(
    x: Any,
    filters: int,
    name: str,
    kernel_size: int = 3,
    activation: str = "relu",
    batch_norm: bool = True,
    **conv_kwargs: Any,
) -> Any:
    """Conv2D ('same') -> optional BatchNormalization -> activation; layers `{name}_conv` etc."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=not batch_norm,
        name=f"{name}_conv",
        **conv_kwargs,
    )(x)
    if batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation(activation, name=f"{name}_{activation}")(x)


def conv_block(
    x: Any,
    filters: int,
    name: str,
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    kernel_initializer: str = "glorot_uniform",
) -> Any:
    """Two 3x3 convolutions `{name}a` and `{name}b`, with dropout between them when > 0."""
    kwargs = {"activation": activation, "batch_norm": batch_norm}
    x = conv_bn_act(x, filters, f"{name}a", kernel_initializer=kernel_initializer, **kwargs)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return conv_bn_act(x, filters, f"{name}b", kernel_initializer=kernel_initializer, **kwargs)


def upsample(x: Any, filters: int, name: str, mode: str, kernel_initializer: str) -> Any:
    """Double the resolution: 2x2/stride-2 Conv2DTranspose, or bilinear resize + 3x3 conv.

    The bilinear form avoids the checkerboard artefacts of transposed convolutions.
    """
    if mode == "transpose":
        return layers.Conv2DTranspose(
            filters, 2, strides=2, padding="same", name=f"{name}_transpose"
        )(x)
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
    return layers.Conv2D(
        filters, 3, padding="same", kernel_initializer=kernel_initializer, name=f"{name}_conv"
    )(x)


def decoder_block(
    stage: int,
    filters: int,
    upsampling: str = "bilinear",
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    kernel_initializer: str = "glorot_uniform",
) -> Callable[[Any, Any], Any]:
    """A U-Net decoder stage as a function of `(x, skip)`: upsample, concat skip, conv block.

    Layers are named `decoder_stage{stage}_up...`, `decoder_stage{stage}a_conv`, and so on;
    `skip=None` upsamples without a skip connection.
    """
    name = f"decoder_stage{stage}"

    def apply(x: Any, skip: Any = None) -> Any:
        x = upsample(x, filters, f"{name}_up", upsampling, kernel_initializer)
        if skip is not None:
            x = layers.Concatenate(name=f"{name}_concat")([x, skip])
        return conv_block(
            x, filters, name, activation, batch_norm, dropout, kernel_initializer=kernel_initializer
        )

    return apply


def logits(x: Any, num_classes: int, kernel_size: int = 1, **conv_kwargs: Any) -> Any:
    """The classifier: a linear conv to `output_channels(num_classes)` logits, in float32.

    float32 keeps the logits exact under a mixed-precision policy.
    """
    return layers.Conv2D(
        output_channels(num_classes),
        kernel_size,
        padding="same",
        dtype="float32",
        name="logits",
        **conv_kwargs,
    )(x)


def image_input(input_shape: tuple[int, int, int]) -> Any:
    """The model input, named `image`."""
    return keras.Input(shape=tuple(input_shape), name="image")
