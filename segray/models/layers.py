"""segray's serialisable custom layers, and the switch for Monte-Carlo dropout.

Importing this module registers MCDropout, MaxUnpooling2D, BilinearUpsampling and
BackbonePreprocess with keras
(package "segray"), which `.keras` files that use them need before loading. The registered names
do not depend on this module's path, so files saved before a move still load.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops


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


#: ImageNet statistics of the RGB channels, on pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The BGR means that caffe-style backbones subtract from 0..255 pixels.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: How keras.applications backbones want their input (``preprocess_input``'s modes), and "raw":
#: 0..255 as they are (backbones that rescale inside, like EfficientNet).
PREPROCESS_MODES = ("tf", "torch", "caffe", "raw")
#: What segray hands a model: pixels in [0, 1] (the scale and percentile rules), or standardised
#: bands (the stats rule).
INPUT_RANGES = ("unit", "standard")


@keras.saving.register_keras_serializable(package="segray")
class BackbonePreprocess(layers.Layer):
    """segray's model input turned into what a keras.applications backbone was trained on.

    The input becomes 0..255 pixels first: unit input times 255; standardised bands mapped onto
    ImageNet's mean and spread (band i like RGB channel i mod 3). Then the backbone's own rule:
    ``tf`` to [-1, 1], ``torch`` ImageNet mean/std, ``caffe`` RGB→BGR (3 bands) minus the BGR
    means, ``raw`` as it is. Band i of N ≠ 3 takes channel i mod 3's constants, as the adapted
    first convolution takes that channel's kernel.
    """

    def __init__(self, mode: str, input_range: str = "unit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES or input_range not in INPUT_RANGES:
            raise ValueError(f"bad preprocessing {mode!r} / input range {input_range!r}")
        self.mode, self.input_range = mode, input_range

    def call(self, inputs: Any) -> Any:
        bands = int(inputs.shape[-1])
        pick = [i % 3 for i in range(bands)]

        def per_band(values: tuple[float, ...]) -> Any:
            return ops.cast(np.asarray(values, np.float32)[pick], inputs.dtype)

        mean, std = per_band(IMAGENET_MEAN), per_band(IMAGENET_STD)
        x = inputs * std + mean if self.input_range == "standard" else inputs
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            return (x - mean) / std
        x = x * 255.0
        if self.mode == "caffe":
            if bands == 3:
                x = ops.flip(x, axis=-1)
            return x - per_band(CAFFE_MEAN_BGR)
        return x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The rule and the input range."""
        return {**super().get_config(), "mode": self.mode, "input_range": self.input_range}


CUSTOM_OBJECTS = {
    "MCDropout": MCDropout,
    "MaxUnpooling2D": MaxUnpooling2D,
    "BilinearUpsampling": BilinearUpsampling,
    "BackbonePreprocess": BackbonePreprocess,
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
