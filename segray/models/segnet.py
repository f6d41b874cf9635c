"""SegNet (Badrinarayanan et al.) and Bayesian SegNet (Kendall et al.).

The encoder is VGG16's 13 convolutions with batch norm; the decoder mirrors it, unpooling with
the max positions of the matching encoder pooling. Bayesian SegNet adds MCDropout after the
deepest `dropout_units` encoder and decoder units. With `monte_carlo=True` (the default) those
layers drop units at inference too, so each call of the model is one sample: average T calls'
softmax for the prediction and use their variance as uncertainty. `set_monte_carlo(model, False)`
makes it deterministic; plain SegNet is always deterministic at inference.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from segray.errors import ModelError
from segray.models.blocks import conv_bn_act, image_input, logits
from segray.models.layers import MaxUnpooling2D, MCDropout

VGG16_CONVS = (2, 2, 3, 3, 3)


def _unpool(x: Any, reference: Any, name: str, mode: str) -> Any:
    if mode == "indices":
        return MaxUnpooling2D(name=name)([x, reference])
    return layers.UpSampling2D(2, name=name)(x)


def build_segnet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    name: str = "segnet",
    bayesian: bool = False,
    base_filters: int = 64,
    depth: int = 5,
    unpooling: str = "indices",
    dropout: float = 0.5,
    dropout_units: int = 3,
    monte_carlo: bool = True,
) -> keras.Model:
    """SegNet with `depth` VGG16 units of widths base_filters * (1, 2, 4, 8, 8)."""
    if bayesian and dropout_units > depth:
        raise ModelError(f"dropout_units must be <= depth ({depth}); got {dropout_units}")
    widths = [base_filters * min(2**unit, 8) for unit in range(depth)]
    sampled = range(depth - dropout_units, depth) if bayesian else range(0)

    def mc_dropout(x: Any, name: str) -> Any:
        return MCDropout(dropout, monte_carlo=monte_carlo, name=name)(x)

    inputs = image_input(input_shape)
    x, references = inputs, []
    # Encoder: conv units, each ended by 2x2 max pooling whose input the decoder unpools with.
    for unit in range(depth):
        for conv in range(VGG16_CONVS[unit]):
            x = conv_bn_act(x, widths[unit], f"encoder{unit + 1}_{conv + 1}")
        references.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{unit + 1}")(x)
        if unit in sampled:
            x = mc_dropout(x, f"encoder{unit + 1}_dropout")
    # Decoder: unpool, then convs; the last conv of a unit narrows to the next unit's width.
    for unit in reversed(range(depth)):
        x = _unpool(x, references[unit], f"unpool{unit + 1}", unpooling)
        convs = VGG16_CONVS[unit] - (1 if unit == 0 else 0)
        for conv in range(convs):
            narrow = conv == convs - 1 and unit > 0
            filters = widths[unit - 1] if narrow else widths[unit]
            x = conv_bn_act(x, filters, f"decoder{unit + 1}_{conv + 1}")
        if unit in sampled:
            x = mc_dropout(x, f"decoder{unit + 1}_dropout")
    return keras.Model(inputs, logits(x, num_classes, kernel_size=3), name=name)
