"""DeepLab v3 and v3+ (Chen et al.): a dilated backbone, atrous spatial pyramid pooling (ASPP)
and, for v3+, a decoder that refines with stride-4 features.

The built-in backbone is a small ResNet of basic blocks whose last stages trade stride for
dilation (output stride 16, or 8); `encoder=` uses a keras.applications backbone's stride-16 and
stride-4 features instead.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from segray.models.blocks import conv_bn_act, image_input, logits
from segray.models.encoders import build_backbone, feature_layer

ASPP_RATES_AT_16 = (6, 12, 18)
# (stride, dilation) of the four backbone stages after the stride-4 stem.
STAGE_PLAN = {16: ((1, 1), (2, 1), (2, 1), (1, 2)), 8: ((1, 1), (2, 1), (1, 2), (1, 4))}


def residual_block(x: Any, filters: int, name: str, stride: int = 1, dilation: int = 1) -> Any:
    """ResNet basic block: two 3x3 convs (the first strided or dilated) plus a shortcut."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, name=f"{name}_shortcut_conv"
        )(x)
        shortcut = layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
    y = conv_bn_act(x, filters, f"{name}_1", strides=stride, dilation_rate=dilation)
    y = layers.Conv2D(
        filters, 3, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_2_conv"
    )(y)
    y = layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


def dilated_resnet(
    x: Any, base_filters: int, blocks_per_stage: tuple[int, ...], output_stride: int
) -> tuple[Any, Any]:
    """The built-in backbone; returns (features at `output_stride`, features at stride 4)."""
    x = conv_bn_act(x, base_filters, "stem_conv1", strides=2)
    x = conv_bn_act(x, base_filters, "stem_conv2")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    low_level = x
    plan = zip(STAGE_PLAN[output_stride], blocks_per_stage, strict=True)
    for stage, ((stride, dilation), blocks) in enumerate(plan, 1):
        for block in range(1, blocks + 1):
            first = block == 1
            x = residual_block(
                x,
                base_filters * 2 ** (stage - 1),
                f"stage{stage}_block{block}",
                stride if first else 1,
                dilation,
            )
        if stage == 1:
            low_level = x
    return x, low_level


def aspp(x: Any, filters: int, rates: tuple[int, ...]) -> Any:
    """ASPP: a 1x1 conv, 3x3 atrous convs at `rates`, image pooling; concat and project.

    The pooling branch has no batch norm: its 1x1 map gives zero variance at batch size 1.
    """
    branches = [conv_bn_act(x, filters, "aspp_1x1", kernel_size=1)]
    branches += [conv_bn_act(x, filters, f"aspp_rate{r}", dilation_rate=r) for r in rates]
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool_gap")(x)
    pooled = conv_bn_act(pooled, filters, "aspp_pool", kernel_size=1, batch_norm=False)
    size = (x.shape[1], x.shape[2])
    branches.append(layers.UpSampling2D(size, name="aspp_pool_resize")(pooled))
    x = layers.Concatenate(name="aspp_concat")(branches)
    return conv_bn_act(x, filters, "aspp_project", kernel_size=1)


def _refine(x: Any, low_level: Any, factor: int, low_filters: int, filters: int) -> Any:
    """The v3+ decoder: upsample to stride 4, concat projected low-level features, two convs."""
    x = layers.UpSampling2D(factor, interpolation="bilinear", name="decoder_upsample")(x)
    low_level = conv_bn_act(low_level, low_filters, "decoder_low_level", kernel_size=1)
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    x = conv_bn_act(x, filters, "decoder_conv1")
    return conv_bn_act(x, filters, "decoder_conv2")


def keras_backbone_features(
    encoder: str,
    input_shape: tuple[int, int, int],
    weights: str | None,
    freeze: bool,
    options: dict[str, Any],
) -> tuple[Any, Any, Any]:
    """(inputs, stride-16 features, stride-4 features) of a keras.applications backbone."""
    model = build_backbone(encoder, input_shape, weights, freeze, **options)
    deep, low = (model.get_layer(feature_layer(encoder, s)).output for s in (16, 4))
    return model.inputs[0], deep, low


def build_deeplab(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    name: str = "deeplabv3",
    plus: bool = False,
    output_stride: int = 16,
    backbone_filters: int = 64,
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
    aspp_filters: int = 256,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    encoder: str | None = None,
    weights: str | None = None,
    freeze_encoder: bool = False,
    **backbone_options: Any,
) -> keras.Model:
    """DeepLab v3 (`plus=False`) or v3+; logits are resized bilinearly to the input size."""
    if encoder is None:
        inputs = image_input(input_shape)
        x, low_level = dilated_resnet(inputs, backbone_filters, blocks_per_stage, output_stride)
    else:
        inputs, x, low_level = keras_backbone_features(
            encoder, input_shape, weights, freeze_encoder, backbone_options
        )
    x = aspp(x, aspp_filters, tuple(r * 16 // output_stride for r in ASPP_RATES_AT_16))
    factor = output_stride
    if plus:
        x = _refine(x, low_level, output_stride // 4, low_level_filters, decoder_filters)
        factor = 4
    x = logits(x, num_classes)
    outputs = layers.UpSampling2D(
        factor, interpolation="bilinear", dtype="float32", name="logits_upsample"
    )(x)
    return keras.Model(inputs, outputs, name=name)
