"""Keras imported for inference without what ``import keras`` loads and no Predictor uses.

Keras 3 imports scikit-learn (its ``keras.wrappers``) whenever it is installed, and
``matplotlib.pyplot`` (``keras.visualization``): 0.8 s and 0.3 s of the 5.4 s ``import keras``
takes on this machine, paid by every Predictor actor and Serve replica before its first mask.
Both are optional to Keras (it defines the same names without them), so :func:`import_keras` hides
them while Keras imports and then lets them go: a later ``import sklearn`` in the same process
works as ever, only Keras's scikit-learn wrappers and image gallery stay unavailable there.
"""

from __future__ import annotations

import sys
from types import ModuleType

#: Modules hidden while Keras imports (each optional to Keras, none on inference's path).
HIDDEN = ("sklearn", "matplotlib.pyplot")


def import_keras() -> ModuleType:
    """``keras``, imported (once per process) without :data:`HIDDEN` where they are not yet
    imported; returns the module."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import keras
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return keras
