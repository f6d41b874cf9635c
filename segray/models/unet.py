"""U-Nets: the classic tutorial U-Net, and a U-Net decoder on keras.applications encoders."""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from segray.errors import ModelError
from segray.models.blocks import conv_block, decoder_block, image_input, logits
from segray.models.encoders import build_backbone, encoder_features

# Dropout per level of the Kaggle nuclei / buildings tutorial, shallow -> bottleneck.
TUTORIAL_DROPOUT = (0.1, 0.1, 0.2, 0.2, 0.3)


def dropout_rates(dropout: float | tuple[float, ...], depth: int) -> tuple[float, ...]:
    """Rates for levels 0..depth: a tuple as given, or the tutorial's rates times a scale."""
    if isinstance(dropout, tuple):
        if len(dropout) != depth + 1:
            raise ModelError(
                f"dropout needs {depth + 1} rates for depth {depth} (one per level);"
                f" got {dropout!r}"
            )
        return dropout
    rates = tuple(TUTORIAL_DROPOUT[min(level, 4)] * dropout for level in range(depth + 1))
    if max(rates) >= 1:
        raise ModelError(f"dropout scale {dropout!r} makes a rate >= 1; rates: {rates!r}")
    return rates


def build_unet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    name: str = "unet",
    base_filters: int = 16,
    depth: int = 4,
    batch_norm: bool = False,
    upsampling: str = "transpose",
    dropout: float | tuple[float, ...] = 1.0,
) -> keras.Model:
    """Classic U-Net: conv blocks of base_filters * 2**level, ELU, he_normal, skips by concat."""
    rates = dropout_rates(dropout, depth)
    style = {"activation": "elu", "batch_norm": batch_norm, "kernel_initializer": "he_normal"}
    inputs = image_input(input_shape)
    x, skips = inputs, []
    # Contracting half: conv block then 2x2 max pooling, keeping each block's output.
    for level in range(depth):
        x = conv_block(
            x, base_filters * 2**level, f"encoder_stage{level}", dropout=rates[level], **style
        )
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder_stage{level}_pool")(x)
    x = conv_block(x, base_filters * 2**depth, "bottleneck", dropout=rates[depth], **style)
    # Expanding half: upsample, concatenate the skip of the same level, conv block.
    for stage, level in enumerate(reversed(range(depth))):
        block = decoder_block(
            stage, base_filters * 2**level, upsampling, dropout=rates[level], **style
        )
        x = block(x, skips[level])
    return keras.Model(inputs, logits(x, num_classes), name=name)


def build_encoder_unet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    name: str,
    encoder: str,
    weights: str | None = None,
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16),
    decoder_batch_norm: bool = True,
    upsampling: str = "bilinear",
    freeze_encoder: bool = False,
    **backbone_options: Any,
) -> keras.Model:
    """U-Net decoder (ReLU, batch norm) on the skips of a keras.applications backbone.

    Stages 0..3 take the skips at strides 16, 8, 4, 2; stage 4 returns to full resolution.
    """
    backbone = build_backbone(encoder, input_shape, weights, freeze_encoder, **backbone_options)
    x, *skips = encoder_features(backbone, encoder)
    for stage, filters in enumerate(decoder_filters):
        skip = skips[stage] if stage < len(skips) else None
        x = decoder_block(stage, filters, upsampling, batch_norm=decoder_batch_norm)(x, skip)
    return keras.Model(backbone.inputs[0], logits(x, num_classes, kernel_size=3), name=name)
