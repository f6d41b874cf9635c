"""The online endpoint on Ray Serve: :mod:`.config` (settings), :mod:`.http` (status codes,
bodies), :mod:`.app` (the deployment and its builder, ``segray.serve.app:app_builder``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``segray.serve:app_builder`` (the import path of segray 0.1 configs) still resolves."""
    if name in ("app_builder", "build_app"):
        from segray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
