"""Model options and class-count rules, without keras: what the registry checks before building.

Each option has its default, a check that raises :class:`~segray.errors.ModelError` quoting the
bad value, and the allowed values in words for ``segray models`` and ``model_info``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segray.errors import ModelError
from segray.models.encoders import BACKBONES


def output_channels(num_classes: int) -> int:
    """Channels of the logits for `num_classes` classes (background included).

    Binary segmentation uses one sigmoid logit; more classes use one softmax logit per class.
    """
    check_num_classes(num_classes)
    return 1 if num_classes == 2 else num_classes


@dataclass(frozen=True)
class Option:
    """A model option: its default, a check that raises ModelError, and the allowed values."""

    default: Any
    check: Callable[[str, Any], Any]
    allowed: str


def choice(default: Any, values: tuple) -> Option:
    def check(name: str, value: Any) -> Any:
        if value not in values or isinstance(value, bool) != isinstance(default, bool):
            raise ModelError(f"{name} must be one of {values!r}; got {value!r}")
        return value

    return Option(default, check, f"one of {values!r}")


def boolean(default: bool) -> Option:
    return choice(default, (True, False))


def integer(default: int, low: int, high: int) -> Option:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ModelError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")
        return value

    return Option(default, check, f"integer in [{low}, {high}]")


def integers(default: tuple[int, ...], length: int | None = None) -> Option:
    size = f"{length} " if length else ""

    def check(name: str, value: Any) -> tuple[int, ...]:
        ok = isinstance(value, (list, tuple)) and (length is None or len(value) == length)
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ModelError(f"{name} must be a tuple of {size}positive integers; got {value!r}")
        if min(value, default=1) < 1:
            raise ModelError(f"{name} must be a tuple of {size}positive integers; got {value!r}")
        return tuple(value)

    return Option(default, check, f"tuple of {size}positive integers")


def rate(default: float) -> Option:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ModelError(f"{name} must be a dropout rate in [0, 1); got {value!r}")
        return float(value)

    return Option(default, check, "rate in [0, 1)")


def rates_or_scale(default: float | tuple[float, ...]) -> Option:
    def check(name: str, value: Any) -> float | tuple[float, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(rate(0.0).check(f"each {name} rate", v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ModelError(
                f"{name} must be a tuple of rates in [0, 1) or a scale >= 0 (0 disables);"
                f" got {value!r}"
            )
        return float(value)

    return Option(default, check, "tuple of rates in [0, 1), or a scale >= 0 (0 disables)")


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(
            f"num_classes counts classes including background and must be an integer >= 2;"
            f" got {num_classes!r}"
        )


UPSAMPLING = ("transpose", "bilinear")


UNET_OPTIONS = {
    "base_filters": integer(16, 1, 1024),
    "depth": integer(4, 1, 6),
    "batch_norm": boolean(False),
    "upsampling": choice("transpose", UPSAMPLING),
    "dropout": rates_or_scale(1.0),
}


ENCODER_UNET_OPTIONS = {
    "decoder_filters": integers((256, 128, 64, 32, 16), length=5),
    "decoder_batch_norm": boolean(True),
    "upsampling": choice("bilinear", UPSAMPLING),
}


FCN_OPTIONS = {
    "base_filters": integer(64, 1, 1024),
    "fc_filters": integer(4096, 1, 8192),
    "dropout": rate(0.5),
}


SEGNET_OPTIONS = {
    "base_filters": integer(64, 1, 1024),
    "depth": integer(5, 1, 5),
    "unpooling": choice("indices", ("indices", "upsampling")),
}


BAYESIAN_OPTIONS = {
    **SEGNET_OPTIONS,
    "dropout": rate(0.5),
    "dropout_units": integer(3, 1, 5),
    "monte_carlo": boolean(True),
}


DEEPLAB_OPTIONS = {
    "output_stride": choice(16, (16, 8)),
    "backbone_filters": integer(64, 1, 1024),
    "blocks_per_stage": integers((2, 2, 2, 2), length=4),
    "aspp_filters": integer(256, 1, 4096),
}


DEEPLAB_PLUS_OPTIONS = {
    **DEEPLAB_OPTIONS,
    "low_level_filters": integer(48, 1, 1024),
    "decoder_filters": integer(256, 1, 4096),
}


# Options that only the built-in dilated backbone has; an `encoder=` replaces them.
BUILTIN_BACKBONE_OPTIONS = ("output_stride", "backbone_filters", "blocks_per_stage")


def encoder_options(backbone: str) -> dict[str, Option]:
    """The options every model on a keras.applications backbone takes."""
    extra = {k: choice(d, allowed) for k, (d, allowed) in BACKBONES[backbone].options.items()}
    # what the model's input holds: set by training from the card's rule (stats: standard)
    ranges = choice("unit", ("unit", "standard"))
    return {"freeze_encoder": boolean(False), "input_range": ranges, **extra}
