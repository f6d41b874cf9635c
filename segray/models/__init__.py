"""The model zoo: build any registered segmentation model by name.

Importing this package is cheap; keras is imported when a model is built. Loaders of `.keras`
files call `custom_objects()` (or use `load_keras`) first so segray's custom layers are known.
"""

from __future__ import annotations

import sys
from typing import Any

from segray.errors import ModelError
from segray.models.options import output_channels
from segray.models.registry import (
    build_model,
    count_params,
    custom_objects,
    describe_models,
    list_models,
    load_keras,
    model_info,
)

__all__ = [
    "MCDropout",
    "MaxUnpooling2D",
    "ModelError",
    "build_model",
    "count_params",
    "custom_objects",
    "describe_models",
    "list_models",
    "load_keras",
    "model_info",
    "monte_carlo_layers",
    "output_channels",
    "set_monte_carlo",
]

_FROM_LAYERS = ("MCDropout", "MaxUnpooling2D", "monte_carlo_layers", "set_monte_carlo")


def __getattr__(name: str) -> Any:
    """Keras-backed names, imported on first use."""
    if name in _FROM_LAYERS:
        from segray.models import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "keras" in sys.modules:
    # keras is loaded already, so registering the custom layers costs nothing: then
    # `import segray.models` alone is enough for keras.saving.load_model.
    custom_objects()
