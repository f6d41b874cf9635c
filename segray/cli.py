"""The ``segray`` command line: a thin layer that maps flags to library calls.

Heavy libraries (tensorflow, ray) are imported inside the commands that need them, so
``segray --help`` answers at once. Errors about the user's input (a bad tile, a missing file, an
unknown model) are printed as one line and exit with status 1; ``SEGRAY_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click


class _Group(click.Group):
    """A click group that turns input errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ValueError, OSError, KeyError) as exc:
            if os.environ.get("SEGRAY_DEBUG"):
                raise
            raise click.ClickException(str(exc) or type(exc).__name__) from exc


endpoint_option = click.option(
    "--s3-endpoint",
    "endpoint",
    default=None,
    envvar="AWS_ENDPOINT_URL",
    help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segray")
def cli() -> None:
    """segray: distributed semantic segmentation of satellite imagery on Ray."""


@cli.command()
@click.option("--out", required=True, help="Output folder or s3:// prefix.")
@click.option(
    "--layout",
    type=click.Choice(["paired", "geotiff", "scene"]),
    default="paired",
    show_default=True,
    help="paired PNG folders, GeoTIFF tiles on a grid, or large GeoTIFF scenes.",
)
@click.option("--count", default=16, show_default=True, help="Number of tiles (or scenes).")
@click.option("--size", default=64, show_default=True, help="Tile size in pixels.")
@click.option("--scene-size", default=2048, show_default=True, help="Scene size (layout=scene).")
@click.option("--seed", default=0, show_default=True)
@click.option("--mode", type=click.Choice(["multiclass", "binary"]), default="multiclass")
@click.option("--bands", type=click.IntRange(3, 4), default=3, show_default=True)
@endpoint_option
def synth(
    out: str,
    layout: str,
    count: int,
    size: int,
    scene_size: int,
    seed: int,
    mode: str,
    bands: int,
    endpoint: str | None,
) -> None:
    """Write a deterministic synthetic satellite collection."""
    from segray import storage
    from segray import synth as synth_mod

    storage.make_bucket(out, endpoint=endpoint)
    summary = synth_mod.write_collection(
        out,
        layout=layout,
        count=count,
        size=size,
        seed=seed,
        mode=mode,
        bands=bands,
        endpoint=endpoint,
        scene_size=scene_size,
    )
    click.echo(json.dumps(summary, indent=2, default=str))


@cli.command()
@click.argument("uris", nargs=-1, required=True)
@click.option("--bands", default=None, help="1-based bands to select, e.g. 1,2,3.")
@endpoint_option
def check(uris: tuple[str, ...], bands: str | None, endpoint: str | None) -> None:
    """Decode tiles (files, folders or s3:// prefixes) and print their shape and georeference."""
    from segray import imagery, storage

    band_list = tuple(int(b) for b in bands.split(",")) if bands else None
    files = [
        f
        for uri in uris
        for f in storage.list_files(uri, suffixes=imagery.TILE_SUFFIXES, endpoint=endpoint) or [uri]
    ]
    bad = 0
    for uri in files:
        try:
            tile = imagery.decode(storage.read_bytes(uri, endpoint=endpoint), uri, bands=band_list)
        except (imagery.TileError, storage.StorageError) as exc:
            if len(files) == 1:
                raise click.ClickException(str(exc)) from exc
            bad += 1
            click.echo(f"error: {exc}", err=True)
            continue
        h, w, c = tile.shape
        geo = (
            f" {tile.crs} origin=({tile.transform.c:.2f}, {tile.transform.f:.2f})"
            if tile.georeferenced
            else ""
        )
        click.echo(f"{uri}: {tile.format} {w}x{h}x{c} {tile.array.dtype}{geo}")
    if bad:
        raise click.ClickException(f"{bad} of {len(files)} tile(s) could not be read")


@cli.command()
@click.option("--classes", "num_classes", default=5, show_default=True)
@click.option("--size", default=128, show_default=True, help="Input height and width.")
@click.option("--channels", default=3, show_default=True)
def models(num_classes: int, size: int, channels: int) -> None:
    """List every model with its parameter count at the given input size."""
    from segray.models import describe_models

    rows = describe_models(num_classes=num_classes, input_shape=(size, size, channels))
    click.echo(f"{'model':<22} {'family':<10} {'stride':>6} {'params':>12}")
    for row in rows:
        params = f"{row['params']:,}" if row.get("params") is not None else row.get("error", "")
        click.echo(f"{row['name']:<22} {row['family']:<10} {row['output_stride']:>6} {params:>12}")


def _parse_bands(value: str | None) -> tuple[int, ...] | None:
    return tuple(int(b) for b in value.split(",")) if value else None


def train_options(func: Any) -> Any:
    """The options of ``segray train`` (shared with jobs/train.py)."""
    options = [
        click.option("--data", required=True, help="Labelled collection: folder or s3:// prefix."),
        click.option(
            "--layout",
            type=click.Choice(["paired", "nuclei", "palette", "polygons"]),
            default="paired",
            show_default=True,
        ),
        click.option("--model", default="unet", show_default=True, help="See `segray models`."),
        click.option("--encoder", default=None, help="Backbone for encoder models."),
        click.option("--weights", default=None, help="'imagenet' for pretrained encoders."),
        click.option(
            "--model-option",
            "model_option",
            multiple=True,
            help="Model option KEY=VALUE (JSON value), e.g. base_filters=8.",
        ),
        click.option("--classes", "num_classes", default=2, show_default=True),
        click.option("--size", default=128, show_default=True, help="Tile size for training."),
        click.option("--bands", default=None, help="1-based bands, e.g. 1,2,3."),
        click.option("--palette", default=None, help="Palette JSON for --layout palette."),
        click.option("--epochs", default=20, show_default=True),
        click.option("--batch-size", default=16, show_default=True, help="Global batch size."),
        click.option("--workers", default=2, show_default=True),
        click.option("--gpu", "use_gpu", is_flag=True, help="One GPU per worker."),
        click.option("--cpus-per-worker", default=1.0, show_default=True),
        click.option("--optimizer", type=click.Choice(["adam", "rmsprop", "sgd"]), default="adam"),
        click.option("--lr", "learning_rate", default=1e-3, show_default=True),
        click.option(
            "--schedule", type=click.Choice(["constant", "cosine", "step"]), default="constant"
        ),
        click.option("--loss", default="ce+dice", show_default=True, help="e.g. 0.7*ce+0.3*dice"),
        click.option("--monitor", default="val_miou", show_default=True),
        click.option("--patience", default=None, type=int, help="Early stopping patience."),
        click.option("--val-fraction", default=0.2, show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option("--no-augment", is_flag=True, help="Turn augmentation off."),
        click.option("--out", required=True, help="Run folder: local or s3:// prefix."),
        click.option("--resume", is_flag=True, help="Continue this run from its last checkpoint."),
        click.option("--resume-from", default=None, help="Start from a checkpoint folder."),
        click.option("--max-failures", default=2, show_default=True),
        endpoint_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def train_config_from_options(**kw: Any) -> Any:
    """A TrainConfig from ``segray train`` options."""
    from segray.augment import AugmentConfig
    from segray.train import TrainConfig

    model_options = {}
    for item in kw.pop("model_option"):
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"expected KEY=VALUE, got {item!r}", param_hint="--model-option"
            )
        try:
            model_options[key] = json.loads(value)
        except ValueError:
            model_options[key] = value
    no_augment = kw.pop("no_augment")
    kw["bands"] = _parse_bands(kw["bands"])
    return TrainConfig(
        model_options=model_options,
        augment=AugmentConfig.off() if no_augment else AugmentConfig(),
        **kw,
    )


@cli.command()
@train_options
def train(**kw: Any) -> None:
    """Train a model on N Ray Train workers and write a run folder."""
    from segray.train import train as run_training

    result = run_training(train_config_from_options(**kw))
    best = {k: round(v, 4) for k, v in result.best.items() if isinstance(v, float)}
    click.echo(
        f"trained epochs {result.starts[-1]}..{result.epochs_run} "
        f"in {result.seconds:.0f} s; best epoch {result.best_epoch}: {best}\n"
        f"run folder: {result.out} (model.keras, model.json, metrics.csv, curves.png)"
    )


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, help="Folder for every output.")
@click.option("--s3", "use_s3", is_flag=True, help="Put every URI on a local moto S3 server.")
@click.option("--count", default=160, show_default=True, help="Synthetic training tiles.")
@click.option("--size", default=64, show_default=True, help="Tile size in pixels.")
@click.option("--epochs", default=16, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Ray Train workers.")
@click.option("--scene-size", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(
    out: str,
    use_s3: bool,
    count: int,
    size: int,
    epochs: int,
    workers: int,
    scene_size: int,
    seed: int,
) -> None:
    """Run the main job on the embedded default: synthesise, train, bulk-predict, evaluate."""
    from segray.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=out,
        use_s3=use_s3,
        count=count,
        size=size,
        epochs=epochs,
        workers=workers,
        scene_size=scene_size,
        seed=seed,
    )
    run_demo(config, echo=click.echo)


def _csv_strings(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def predict_options(func: Any) -> Any:
    """The options of ``segray predict`` (also parsed by jobs/batch_predict.py)."""
    from segray import tiling  # numpy only: keeps `segray --help` instant

    options = [
        click.option("--model", required=True, help="Run folder, model folder or .keras file."),
        click.option("--input", "input_", default="", help="Folder or s3:// prefix of tiles."),
        click.option("--output", required=True, help="Folder or s3:// prefix for the masks."),
        click.option("--manifest", default=None, help="Parquet or text list of input URIs."),
        endpoint_option,
        click.option("--pattern", default=None, help="Glob on the relative path or file name."),
        click.option("--suffixes", default=None, help="e.g. .tif,.png"),
        click.option("--batch-size", default=16, show_default=True),
        click.option("--concurrency", default=1, show_default=True, help="Predictor actors."),
        click.option("--gpus-per-actor", default=0.0, show_default=True),
        click.option("--cpus-per-actor", default=1.0, show_default=True),
        click.option(
            "--output-mode",
            type=click.Choice(["classes", "binary", "probability"]),
            default="classes",
            show_default=True,
        ),
        click.option("--class-index", default=1, show_default=True),
        click.option("--threshold", default=None, type=float),
        click.option("--bands", default=None, help="1-based bands, e.g. 1,2,3."),
        click.option("--overwrite", is_flag=True, help="Redo tiles whose mask exists."),
        click.option("--max-error-rate", default=0.0, show_default=True),
        click.option("--scene", is_flag=True, help="Inputs are large GeoTIFF scenes."),
        click.option("--window", default=None, type=int, help="Scene window (default: model)."),
        click.option(
            "--overlap", default=tiling.OVERLAP, show_default=True, help="Window overlap (px)."
        ),
        click.option("--blend", type=click.Choice(tiling.BLENDS), default=tiling.BLEND),
        click.option(
            "--mc-samples",
            default=0,
            show_default=True,
            help="Monte-Carlo dropout passes; writes <name>.uncertainty.<ext> beside each mask.",
        ),
        click.option(
            "--footprints",
            default=None,
            type=int,
            help="Class id to vectorise; writes <name>.geojson beside each mask.",
        ),
        click.option("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def predict_config_from_options(**kw: Any) -> Any:
    """A PredictConfig from ``segray predict`` options."""
    from segray.predict import PredictConfig

    kw["input"] = kw.pop("input_")
    kw["bands"] = _parse_bands(kw["bands"])
    kw["suffixes"] = _csv_strings(kw["suffixes"])
    return PredictConfig(**kw)


@cli.command()
@predict_options
def predict(**kw: Any) -> None:
    """Segment a tile collection (or scenes) with Ray Data; write masks and a manifest."""
    from segray.predict import predict as run_predict

    result = run_predict(predict_config_from_options(**kw), echo=click.echo)
    if not result.ok:
        raise click.ClickException(
            f"{result.error_rate:.1%} of inputs failed, above --max-error-rate "
            f"{kw['max_error_rate']:.1%}; see the manifest for each reason"
        )


@cli.command()
@click.option("--model", required=True, help="Run folder, model folder or .keras file.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--replicas", default=1, show_default=True)
@click.option("--max-replicas", default=None, type=int, help="Autoscale from --replicas.")
@click.option("--max-batch-size", default=16, show_default=True)
@click.option("--batch-wait-ms", default=10.0, show_default=True)
@click.option("--num-gpus", default=0.0, show_default=True, help="GPUs per replica.")
@click.option("--max-body-mb", default=64, show_default=True)
@endpoint_option
def serve(
    model: str,
    host: str,
    port: int,
    replicas: int,
    max_replicas: int | None,
    max_batch_size: int,
    batch_wait_ms: float,
    num_gpus: float,
    max_body_mb: int,
    endpoint: str | None,
) -> None:
    """Serve the model over HTTP (POST /v1/segment); the token comes from SEGRAY_API_TOKEN."""
    from segray.serve import run

    scale: Any = replicas
    if max_replicas:
        scale = {"min_replicas": replicas, "max_replicas": max_replicas}
    click.echo(f"serving {model} on http://{host}:{port} (docs at /docs); Ctrl-C stops")
    run(
        model,
        host=host,
        port=port,
        replicas=scale,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000,
        num_gpus=num_gpus,
        max_body_bytes=max_body_mb * 2**20,
        endpoint=endpoint,
    )


@cli.command("eval")
@click.option("--model", required=True, help="Run folder or model.keras (local or s3://).")
@click.option("--data", required=True, help="Labelled collection (any --layout).")
@click.option("--layout", default="paired", show_default=True)
@click.option("--out", default=None, help="Report folder (default: <model>/eval).")
@click.option("--worst", default=4, show_default=True, help="Overlays of the k worst tiles.")
@click.option("--palette", default=None)
@endpoint_option
def eval_cmd(
    model: str,
    data: str,
    layout: str,
    out: str | None,
    worst: int,
    palette: str | None,
    endpoint: str | None,
) -> None:
    """Per-class IoU, Dice, pixel accuracy, confusion matrix and the worst tiles."""
    from segray import storage
    from segray.evaluate import EvalConfig, evaluate

    out = out or storage.join(model, "eval")
    doc = evaluate(
        EvalConfig(model, data, out, layout=layout, worst=worst, palette=palette, endpoint=endpoint)
    )
    click.echo(storage.read_text(storage.join(out, "report.md"), endpoint=endpoint))
    click.echo(f"report: {storage.join(out, 'report.md')} ({doc['tiles']} tiles)")


@cli.group()
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


@bench.command("train")
@click.option("--tiles", default=160, show_default=True)
@click.option("--size", default=64, show_default=True)
@click.option("--batch-size", "batch", default=16, show_default=True)
@click.option("--epochs", default=4, show_default=True)
@click.option("--base-filters", default=16, show_default=True)
def bench_train_cmd(tiles: int, size: int, batch: int, epochs: int, base_filters: int) -> None:
    """Ray Train (1 and 2 workers) against bare single-process Keras."""
    from segray.bench.train import bench_train

    bench_train(tiles, size, batch, epochs, base_filters, echo=click.echo)


@bench.command("serve")
@click.option("--model", default=None, help="Model URI (default: untrained 128 px U-Net).")
@click.option("--requests", default=200, show_default=True, help="Requests per level.")
@click.option("--concurrency", default="1,4,16", show_default=True)
@click.option("--max-batch-size", default=16, show_default=True)
@click.option("--batch-wait-ms", default=5.0, show_default=True)
@click.option("--ceiling-seconds", default=5.0, show_default=True)
def bench_serve_cmd(
    model: str | None,
    requests: int,
    concurrency: str,
    max_batch_size: int,
    batch_wait_ms: float,
    ceiling_seconds: float,
) -> None:
    """Serve throughput and latency at 1/4/16 clients, batching on and off, vs the ceiling."""
    from segray.bench.serve import bench_serve

    bench_serve(
        model_uri=model,
        requests_per_level=requests,
        concurrencies=tuple(int(c) for c in concurrency.split(",")),
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000,
        ceiling_seconds=ceiling_seconds,
        echo=click.echo,
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="segray")


if __name__ == "__main__":
    sys.exit(main())
