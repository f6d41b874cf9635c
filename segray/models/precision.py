"""Numeric precision of a model's arithmetic: ``fp32``, ``bf16`` or ``fp16`` (mixed).

Mixed precision keeps every variable in float32 and computes in the lower type (Keras's
``mixed_bfloat16`` / ``mixed_float16`` policies); the classifier and what follows it (layers named
``logits…``: the classifier conv, FCN's upscore, DeepLab's upsampling) stay float32 so scores and
thresholds are exact. ``bf16`` pays on CPUs with AVX512-BF16 or AMX
(oneDNN runs bfloat16 convolutions natively; measured here 1.5-1.7x a float32 U-Net's predict,
``segray bench precision``) and on recent GPUs; ``fp16`` pays on GPUs and is emulated, slower than
float32, on CPUs. Training records its precision in the model card, and inference runs a model in
the card's precision unless told otherwise: :func:`with_precision` rebuilds a loaded model under
another policy with the same weights.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any, Literal, get_args

log = logging.getLogger("segray.models.precision")

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: Keras dtype policy of each precision.
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
#: Layers whose names start so are kept in float32 under any policy.
FLOAT32_PREFIX = "logits"


def policy(precision: str) -> str:
    """The Keras dtype policy name of ``precision``."""
    try:
        return POLICIES[precision]
    except KeyError:
        allowed = ", ".join(PRECISIONS)
        raise ValueError(f"precision must be one of {allowed}; got {precision!r}") from None


@cache
def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def advice(precision: str, gpu: bool) -> str | None:
    """A note when ``precision`` runs slower than float32 on this hardware, else None."""
    if gpu or precision == "fp32":
        return None
    if precision == "fp16":
        return "fp16 on a CPU is emulated and slower than fp32; use bf16 or a GPU"
    if not cpu_has_bf16():
        return "this CPU has no AVX512-BF16 or AMX: bf16 is emulated and may be slower than fp32"
    return None


def model_precision(model: Any) -> str:
    """The precision a model computes in (that of its first layer with weights)."""
    for layer in _layers(model):
        if layer.weights and not layer.name.startswith(FLOAT32_PREFIX):
            name = getattr(layer.dtype_policy, "name", "float32")
            return next((p for p, n in POLICIES.items() if n == name), "fp32")
    return "fp32"


def with_precision(model: Any, precision: str) -> Any:
    """``model`` computing in ``precision``: itself when it already does, else a clone of it
    under that policy (nested models too) with the same float32 weights."""
    import keras

    target = policy(precision)
    if model_precision(model) == precision:
        return model

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name.startswith(FLOAT32_PREFIX) else target
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _layers(model: Any) -> Any:
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers"):
            yield from _layers(layer)
        else:
            yield layer
