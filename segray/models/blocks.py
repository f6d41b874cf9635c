"""Building blocks shared by the model families, and segray's serialisable custom layers.

Importing this module registers MCDropout, MaxUnpooling2D and BilinearUpsampling with keras
(package "segray"), which `.keras` files that use them need before loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from segray.models.registry import output_channels

# --- custom layers -------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="segray")
class MCDropout(layers.Dropout):
    """Dropout that can stay on at inference, for Monte-Carlo sampling (Gal & Ghahramani).

    With `monte_carlo=True` every call drops units, so calling the model N times on the same
    input gives N samples of the predictive distribution (mean = prediction, variance =
    uncertainty). With `monte_carlo=False` it is plain Dropout: active only when training.
    Toggle a built model with `set_monte_carlo(model, enabled)`.
    """

    def __init__(self, rate: float, monte_carlo: bool = True, **kwargs: Any) -> None:
        super().__init__(rate, **kwargs)
        self.monte_carlo = monte_carlo

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Drop units when training or when Monte-Carlo sampling is on."""
        return super().call(inputs, training=bool(training) or self.monte_carlo)

    def get_config(self) -> dict[str, Any]:
        """Keras config, with the Monte-Carlo flag."""
        return {**super().get_config(), "monte_carlo": self.monte_carlo}


@keras.saving.register_keras_serializable(package="segray")
class MaxUnpooling2D(layers.Layer):
    """SegNet unpooling: put each value of `x` where its 2x2 window's maximum was.

    Called on `[x, reference]`: `reference` is the encoder tensor before 2x2/stride-2 max
    pooling and `x` has the pooled shape. The max positions ("indices") are recomputed from
    `reference` with keras.ops, so no index tensor travels through the graph.
    """

    def call(self, inputs: list[Any]) -> Any:
        """Scatter `x` to the argmax position of each window of `reference`; zeros elsewhere."""
        x, reference = inputs
        _, height, width, channels = ops.shape(reference)
        half_h, half_w = height // 2, width // 2
        windows = ops.reshape(reference, (-1, half_h, 2, half_w, 2, channels))
        windows = ops.transpose(windows, (0, 1, 3, 5, 2, 4))
        windows = ops.reshape(windows, (-1, half_h, half_w, channels, 4))
        switches = ops.one_hot(ops.argmax(windows, axis=-1), 4, dtype=x.dtype)
        out = ops.expand_dims(x, -1) * switches
        out = ops.reshape(out, (-1, half_h, half_w, channels, 2, 2))
        out = ops.transpose(out, (0, 1, 4, 2, 5, 3))
        return ops.reshape(out, (-1, height, width, channels))

    def compute_output_shape(self, input_shapes: list[tuple]) -> tuple:
        """The reference's shape."""
        return tuple(input_shapes[1])


@keras.saving.register_keras_serializable(package="segray")
class BilinearUpsampling(keras.initializers.Initializer):
    """Conv2DTranspose kernel initialised to bilinear interpolation, as in FCN (Long et al.)."""

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """Kernel of shape (k, k, out, in): a bilinear filter on the channel diagonal."""
        size, _, n_out, n_in = shape
        factor = (size + 1) // 2
        center = factor - 1 if size % 2 == 1 else factor - 0.5
        grid = np.arange(size)
        line = 1 - np.abs(grid - center) / factor
        kernel = np.zeros(shape, dtype="float32")
        for i in range(min(n_out, n_in)):
            kernel[:, :, i, i] = np.outer(line, line)
        return ops.convert_to_tensor(kernel, dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        """No arguments."""
        return {}


CUSTOM_OBJECTS = {
    "MCDropout": MCDropout,
    "MaxUnpooling2D": MaxUnpooling2D,
    "BilinearUpsampling": BilinearUpsampling,
}


def _all_layers(model: keras.Model) -> list[layers.Layer]:
    """Every layer of `model`, looking inside nested models."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += _all_layers(layer)
    return found


def monte_carlo_layers(model: keras.Model) -> list[MCDropout]:
    """The MCDropout layers of `model`, nested models included."""
    return [layer for layer in _all_layers(model) if isinstance(layer, MCDropout)]


def set_monte_carlo(model: keras.Model, enabled: bool) -> int:
    """Switch Monte-Carlo dropout on or off in every MCDropout layer; return how many.

    Compiled predict/evaluate functions are dropped so that `model.predict` sees the change.
    """
    found = monte_carlo_layers(model)
    for layer in found:
        layer.monte_carlo = bool(enabled)
    for attribute in ("predict_function", "test_function", "train_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    return len(found)


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
