"""The model registry: the one place that knows every model name, its options and its stride.

Importing this module is cheap (no keras); the family modules are imported when a model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segray.errors import ModelError
from segray.models.encoders import BACKBONES
from segray.models.options import (
    BAYESIAN_OPTIONS,
    BUILTIN_BACKBONE_OPTIONS,
    DEEPLAB_OPTIONS,
    DEEPLAB_PLUS_OPTIONS,
    ENCODER_UNET_OPTIONS,
    FCN_OPTIONS,
    SEGNET_OPTIONS,
    UNET_OPTIONS,
    Option,
    check_num_classes,
    choice,
    encoder_options,
)

if TYPE_CHECKING:
    import keras


# --- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model: builder path, options, stride and encoder rules."""

    name: str
    family: str
    builder: str  # "module:function" in segray.models
    description: str
    options: Mapping[str, Option]
    stride: Callable[[Mapping[str, Any]], int]
    fixed: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the variant
    encoder: str | None = None  # the keras.applications backbone bound to this model
    encoders: tuple[str, ...] = ()  # backbones accepted through `encoder=`

    @property
    def supports_pretrained(self) -> bool:
        """Whether `weights="imagenet"` is accepted: only with a keras.applications encoder."""
        return self.encoder is not None


def _fixed_stride(stride: int) -> Callable[[Mapping[str, Any]], int]:
    return lambda opts: stride


def _depth_stride(opts: Mapping[str, Any]) -> int:
    return 2 ** opts["depth"]


def _option_stride(opts: Mapping[str, Any]) -> int:
    return opts["output_stride"]


def _encoder_unet(backbone: str) -> ModelSpec:
    row = BACKBONES[backbone]
    return ModelSpec(
        name=f"unet-{backbone}",
        family="unet",
        builder="unet:build_encoder_unet",
        description=f"U-Net decoder on a keras.applications {row.constructor} encoder.",
        options={**ENCODER_UNET_OPTIONS, **encoder_options(backbone)},
        stride=_fixed_stride(row.strides[0]),
        encoder=backbone,
    )


def _with_encoder(spec: ModelSpec, backbone: str) -> ModelSpec:
    """Bind a keras.applications backbone to a model that accepts `encoder=` (DeepLab)."""
    options = {k: v for k, v in spec.options.items() if k not in BUILTIN_BACKBONE_OPTIONS}
    # keras.applications backbones cannot be dilated: their stride-16 features are the deepest used
    options["output_stride"] = choice(16, (16,))
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-{backbone}",
        options={**options, **encoder_options(backbone)},
        encoder=backbone,
        encoders=(),
    )


_ALL = tuple(BACKBONES)
# name, family, "module:builder" in segray.models, description, options, stride, extras.
_SPECS = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "unet",
            "unet",
            "unet:build_unet",
            "Classic U-Net as in the Kaggle nuclei tutorial: 16..256 filters, ELU, dropout."
            " With encoder=NAME it is unet-NAME.",
            UNET_OPTIONS,
            _depth_stride,
            encoders=_ALL,
        ),
        *(_encoder_unet(backbone) for backbone in BACKBONES),
        *(
            ModelSpec(
                variant,
                "fcn",
                "fcn:build_fcn",
                f"{variant.upper()} (Long et al.) on a VGG16-style encoder; {skips}.",
                FCN_OPTIONS,
                _fixed_stride(32),
                fixed={"variant": variant},
            )
            for variant, skips in [
                ("fcn8s", "pool4 and pool3 skips"),
                ("fcn16s", "pool4 skip"),
                ("fcn32s", "no skips"),
            ]
        ),
        ModelSpec(
            "segnet",
            "segnet",
            "segnet:build_segnet",
            "SegNet (Badrinarayanan et al.): VGG16 encoder, decoder unpooling by max indices.",
            SEGNET_OPTIONS,
            _depth_stride,
            fixed={"bayesian": False},
        ),
        ModelSpec(
            "bayesian-segnet",
            "segnet",
            "segnet:build_segnet",
            "Bayesian SegNet (Kendall et al.): SegNet with Monte-Carlo dropout in the central"
            " units; repeated calls sample the predictive distribution.",
            BAYESIAN_OPTIONS,
            _depth_stride,
            fixed={"bayesian": True},
        ),
        ModelSpec(
            "deeplabv3",
            "deeplab",
            "deeplab:build_deeplab",
            "DeepLab v3: dilated ResNet backbone (or encoder=NAME) and ASPP.",
            DEEPLAB_OPTIONS,
            _option_stride,
            fixed={"plus": False},
            encoders=_ALL,
        ),
        ModelSpec(
            "deeplabv3plus",
            "deeplab",
            "deeplab:build_deeplab",
            "DeepLab v3+: DeepLab v3 plus a decoder that refines with stride-4 features.",
            DEEPLAB_PLUS_OPTIONS,
            _option_stride,
            fixed={"plus": True},
            encoders=_ALL,
        ),
    ]
}


def list_models() -> list[str]:
    """Names of every registered model, in registry order."""
    return list(_SPECS)


def _spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ModelError(f"unknown model {name!r}; available models: {', '.join(_SPECS)}")
    return _SPECS[name]


def _resolve(name: str, encoder: str | None) -> ModelSpec:
    """The spec for `name`, with `encoder` bound where the model accepts one."""
    spec = _spec(name)
    if encoder is None or encoder == spec.encoder:
        return spec
    if spec.encoder is not None:
        raise ModelError(f"{name!r} already has the {spec.encoder!r} encoder; got {encoder!r}")
    if not spec.encoders:
        takers = [s.name for s in _SPECS.values() if s.encoders]
        raise ModelError(f"{name!r} takes no encoder; models that do: {', '.join(takers)}")
    if encoder not in spec.encoders:
        raise ModelError(f"encoder must be one of {spec.encoders!r}; got {encoder!r}")
    if f"{name}-{encoder}" in _SPECS:  # a registered variant, e.g. unet-mobilenetv2
        return _SPECS[f"{name}-{encoder}"]
    return _with_encoder(spec, encoder)


def model_info(name: str, encoder: str | None = None) -> dict[str, Any]:
    """What a model is: name, family, output_stride, supports_pretrained, description, options.

    `options` maps each option name to its default and its allowed values.
    """
    spec = _resolve(name, encoder)
    defaults = {k: o.default for k, o in spec.options.items()}
    info = {
        "name": spec.name,
        "family": spec.family,
        "output_stride": spec.stride(defaults),
        "supports_pretrained": spec.supports_pretrained,
        "description": spec.description,
        "options": {
            k: {"default": o.default, "allowed": o.allowed} for k, o in spec.options.items()
        },
        "encoder": spec.encoder,
        "encoders": list(spec.encoders),
    }
    if spec.encoder is not None:
        info["preprocessing"] = BACKBONES[spec.encoder].preprocessing
    return info


# --- validation ----------------------------------------------------------------------------


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    ok = isinstance(input_shape, (list, tuple)) and len(input_shape) == 3
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in input_shape):
        raise ModelError(
            f"input_shape must be (height, width, channels) integers; got {input_shape!r}"
        )
    if min(input_shape) < 1:
        raise ModelError(f"input_shape sizes must be positive; got {input_shape!r}")
    return tuple(input_shape)


def _nearest_sizes(size: int, stride: int) -> str:
    below, above = (size // stride) * stride, math.ceil(size / stride) * stride
    return f"{below} or {above}" if below > 0 else f"{above}"


def _check_stride(spec: ModelSpec, input_shape: tuple[int, int, int], stride: int) -> None:
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size % stride:
            raise ModelError(
                f"{axis} {size} is not divisible by the output stride {stride} of {spec.name!r};"
                f" nearest valid {axis}s: {_nearest_sizes(size, stride)}"
            )


def _check_weights(spec: ModelSpec, weights: str | None, channels: int) -> None:
    if weights is None:
        return
    if spec.encoder is None:
        hint = (
            f"pass encoder= one of {spec.encoders!r}"
            if spec.encoders
            else "pretrained models: unet-NAME, deeplabv3(plus) with encoder=NAME"
        )
        raise ModelError(
            f"{spec.name!r} has no pretrained weights without a keras.applications encoder;"
            f" weights must be None ({hint}); got {weights!r}"
        )
    if weights != "imagenet" and not (isinstance(weights, str) and os.path.isfile(weights)):
        raise ModelError(
            f"weights must be one of (None, 'imagenet') or the path of an existing backbone"
            f" weights file; got {weights!r}"
        )
    if channels != 3 and BACKBONES[spec.encoder].mode == "raw":
        raise ModelError(
            f"{spec.encoder} rescales its input inside, so its pretrained weights cannot be "
            f"adapted to {channels} bands; use another encoder or weights=None"
        )


def _resolve_options(spec: ModelSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ModelError(
            f"unknown option {unknown[0]!r} for {spec.name!r}; allowed options:"
            f" {', '.join(spec.options) or 'none'}"
        )
    values = {k: o.default for k, o in spec.options.items()}
    values.update({k: spec.options[k].check(k, v) for k, v in options.items()})
    return values


# --- building ------------------------------------------------------------------------------


def custom_objects() -> dict[str, Any]:
    """Register segray's custom layers with keras and return them by class name.

    Call it (or `load_model`) before `keras.saving.load_model` on a segray `.keras` file when
    keras was imported after `segray.models`; `build_model` calls it itself.
    """
    from segray.models import layers

    return dict(layers.CUSTOM_OBJECTS)


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int] = (128, 128, 3),
    encoder: str | None = None,
    weights: str | None = None,
    **options: Any,
) -> keras.Model:
    """Build the registered model `name`; its outputs are logits of shape (B, H, W, C).

    C is `output_channels(num_classes)`. `encoder` picks a keras.applications backbone where the
    model takes one; `weights="imagenet"` is forwarded to it. Options are listed by
    `model_info(name)["options"]`; any problem raises ModelError naming the allowed values.
    """
    spec = _resolve(name, encoder)
    check_num_classes(num_classes)
    input_shape = _check_shape(input_shape)
    _check_weights(spec, weights, input_shape[2])
    values = _resolve_options(spec, options)
    _check_stride(spec, input_shape, spec.stride(values))
    custom_objects()
    module, function = spec.builder.split(":")
    builder = getattr(importlib.import_module(f"segray.models.{module}"), function)
    kwargs: dict[str, Any] = {**spec.fixed, **values}
    if spec.encoder is not None:
        kwargs.update(encoder=spec.encoder, weights=weights)
    return builder(num_classes, input_shape, name=spec.name, **kwargs)


def count_params(
    name: str, num_classes: int, input_shape: tuple[int, int, int], **options: Any
) -> int:
    """Number of parameters (trainable and not) of a model built with these arguments."""
    return int(build_model(name, num_classes, input_shape, **options).count_params())


def describe_models(
    num_classes: int, input_shape: tuple[int, int, int] = (128, 128, 3)
) -> list[dict[str, Any]]:
    """One row per registered model: name, family, output_stride, params, error.

    `params` is None and `error` says why where the model cannot be built at this size.
    """
    rows = []
    for name in _SPECS:
        info = model_info(name)
        row = {"name": name, "family": info["family"], "output_stride": info["output_stride"]}
        try:
            row.update(params=count_params(name, num_classes, input_shape), error=None)
        except ModelError as exc:
            row.update(params=None, error=str(exc))
        rows.append(row)
    return rows


def load_keras(path: str | os.PathLike[str], compile: bool = False) -> keras.Model:
    """Load a segray `.keras` file with safe_mode=True, custom layers registered first."""
    custom_objects()
    import keras

    return keras.saving.load_model(path, compile=compile, safe_mode=True)
