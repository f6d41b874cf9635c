"""``segray export RUN``: a model out of segray (ONNX, SavedModel, LiteRT), card and MLM item."""

from __future__ import annotations

from typing import Any

import click

from segray.cli.options import config_options, from_options
from segray.inference.export import ExportConfig


@click.command("export")
@click.argument("run")
@config_options(ExportConfig)
def export_cmd(run: str, **kw: Any) -> None:
    """Export the model of run folder (or model.keras) RUN: ONNX for ONNX Runtime and QGIS's
    Deepness, a TensorFlow SavedModel, or LiteRT; the card and a STAC MLM item go beside it."""
    from segray.inference.export import export_model

    done = export_model(from_options(ExportConfig, kw).replace(model=run))
    click.echo(f"model: {done.model}\ncard: {done.card}\nSTAC MLM item: {done.item}")
