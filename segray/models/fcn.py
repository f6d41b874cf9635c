"""Fully convolutional networks (Long, Shelhamer & Darrell): FCN-32s, FCN-16s and FCN-8s.

A VGG16-style encoder whose fc6/fc7 are convolutions; class scores at stride 32 are upsampled by
transposed convolutions initialised to bilinear interpolation, fused with scores from pool4
(16s) and pool3 (8s). Score layers start at zero, as in the paper.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from segray.models.blocks import image_input
from segray.models.layers import BilinearUpsampling
from segray.models.options import output_channels

VGG16_CONVS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (1, 2, 4, 8, 8)  # times base_filters: 64, 128, 256, 512, 512


def vgg_encoder(x: Any, base_filters: int) -> list[Any]:
    """VGG16 conv blocks with max pooling; returns pool1..pool5 (strides 2..32)."""
    pools = []
    for block, (convs, width) in enumerate(zip(VGG16_CONVS, VGG16_WIDTHS, strict=True), 1):
        for conv in range(1, convs + 1):
            x = layers.Conv2D(
                base_filters * width,
                3,
                padding="same",
                activation="relu",
                name=f"block{block}_conv{conv}",
            )(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
        pools.append(x)
    return pools


def _score(x: Any, channels: int, name: str) -> Any:
    return layers.Conv2D(channels, 1, kernel_initializer="zeros", name=name)(x)


def _upscore(x: Any, channels: int, factor: int, name: str, **kwargs: Any) -> Any:
    return layers.Conv2DTranspose(
        channels,
        2 * factor,
        strides=factor,
        padding="same",
        use_bias=False,
        kernel_initializer=BilinearUpsampling(),
        name=name,
        **kwargs,
    )(x)


def build_fcn(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    name: str = "fcn8s",
    variant: str = "fcn8s",
    base_filters: int = 64,
    fc_filters: int = 4096,
    dropout: float = 0.5,
) -> keras.Model:
    """FCN-`variant` with VGG widths `base_filters`*(1,2,4,8,8) and fc6/fc7 of `fc_filters`."""
    channels = output_channels(num_classes)
    inputs = image_input(input_shape)
    _, _, pool3, pool4, pool5 = vgg_encoder(inputs, base_filters)
    x = layers.Conv2D(fc_filters, 7, padding="same", activation="relu", name="fc6")(pool5)
    x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Conv2D(fc_filters, 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    scores = _score(x, channels, "score_fr")
    # Fuse coarse scores with finer pool scores, one 2x step at a time (16s: pool4; 8s: +pool3).
    pools = [("pool4", pool4), ("pool3", pool3)]
    skips = pools[: {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2}[variant]]
    for pool, skip in skips:
        up = _upscore(scores, channels, 2, f"upscore_to_{pool}")
        scores = layers.Add(name=f"fuse_{pool}")([up, _score(skip, channels, f"score_{pool}")])
    factor = 32 // 2 ** len(skips)
    outputs = _upscore(scores, channels, factor, "logits", dtype="float32")
    return keras.Model(inputs, outputs, name=name)
