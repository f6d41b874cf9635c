"""The ``segray`` command line: a thin layer that maps flags to configs and calls the library.

Each command's options come from its config's fields (:mod:`segray.cli.options`), so a default or
a choice is written once, in the config. Heavy libraries (tensorflow, ray) are imported inside the
commands that need them, so ``segray --help`` answers at once. segray's own errors
(:class:`~segray.errors.SegrayError`: bad input, settings or data) and click's are printed as one
line with exit status 1; anything else is a bug and shows its traceback. ``-v`` shows Ray's own
logs and worker output, ``-q`` only warnings.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from segray.bulk.config import PoolConfig, PredictConfig, checked_pool_name
from segray.cli.options import config_options, from_options, given, option_for
from segray.datasets.labels import DatasetSpec
from segray.devtools import synth as synth_data
from segray.devtools.demo import DemoConfig
from segray.errors import SegrayError
from segray.evaluate.evaluate import EvalConfig
from segray.serve.config import ServeConfig
from segray.train.augment import AugmentConfig
from segray.train.config import TrainConfig
from segray.train.tune import TuneConfig as TuneSettings

log = logging.getLogger("segray.cli")


class _Group(click.Group):
    """A click group that turns segray's own errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SegrayError as exc:
            if ctx.meta.get("segray.verbosity", 0) >= 2:
                raise
            raise click.ClickException(str(exc)) from exc


endpoint_option = click.option(
    "--s3-endpoint",
    "endpoint",
    default=None,
    help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segray")
@click.option("-v", "--verbose", count=True, help="More output: -v Ray's logs, -vv tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """segray: distributed semantic segmentation of satellite imagery on Ray."""
    from segray import log as segray_log

    level = -1 if quiet else verbose
    ctx.meta["segray.verbosity"] = level
    segray_log.configure(level)


@cli.command()
@click.option("--out", required=True, help="Output folder or s3:// prefix.")
@click.option(
    "--layout",
    type=click.Choice((*synth_data.LAYOUTS, "scenes")),
    default="paired",
    show_default=True,
    help="paired PNG folders, GeoTIFF tiles on a grid, large GeoTIFF scenes, or scenes with "
    "their buildings as one WGS84 GeoJSON (the scenes training layout).",
)
@click.option("--count", default=16, show_default=True, help="Number of tiles (or scenes).")
@click.option("--size", default=64, show_default=True, help="Tile size in pixels.")
@click.option("--scene-size", default=2048, show_default=True, help="Scene size (layout=scene).")
@click.option("--seed", default=0, show_default=True)
@click.option("--mode", type=click.Choice(synth_data.MODES), default=synth_data.MODES[0])
@click.option(
    "--bands",
    type=click.Choice([str(b) for b in synth_data.BANDS]),
    default=str(synth_data.BANDS[0]),
    show_default=True,
    help="RGB, RGB+NIR, or RGB+NIR+SWIR1+SWIR2 (uint16 only).",
)
@click.option(
    "--dtype",
    type=click.Choice(synth_data.spectra.DTYPES),
    default="uint8",
    show_default=True,
    help="uint16: reflectance x 10,000 with no-data corners (GeoTIFF layouts).",
)
@endpoint_option
def synth(
    out: str,
    layout: str,
    count: int,
    size: int,
    scene_size: int,
    seed: int,
    mode: str,
    bands: str,
    dtype: str,
    endpoint: str | None,
) -> None:
    """Write a deterministic synthetic satellite collection."""
    from segray.io import storage

    fs = storage.filesystem(out, endpoint)
    fs.make_bucket(out)
    if layout == "scenes":
        from segray.devtools.labelled_scenes import write_labelled_scenes

        summary = write_labelled_scenes(
            out,
            count=count,
            scene_size=scene_size,
            seed=seed,
            bands=int(bands),
            dtype=dtype,
            fs=fs,
        )
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    summary = synth_data.write_collection(
        out,
        layout=layout,
        count=count,
        size=size,
        seed=seed,
        mode=mode,
        bands=int(bands),
        fs=fs,
        scene_size=scene_size,
        dtype=dtype,
    )
    click.echo(json.dumps(summary, indent=2, default=str))


@cli.command()
@click.argument("uris", nargs=-1, required=True)
@option_for("bands", DatasetSpec.model_fields["bands"])
@endpoint_option
def check(uris: tuple[str, ...], bands: tuple[int, ...] | None, endpoint: str | None) -> None:
    """Decode tiles (files, folders or s3:// prefixes) and print their shape and georeference."""
    from segray.io import imagery, storage
    from segray.io.readers import open_reader

    files = [
        f
        for uri in uris
        for f in storage.filesystem(uri, endpoint).list_files(uri, suffixes=imagery.TILE_SUFFIXES)
        or [uri]
    ]
    bad = 0
    for uri in files:
        try:
            data = storage.filesystem(uri, endpoint).read_bytes(uri)
            tile = open_reader(data, uri=uri).read(bands=bands)
        except SegrayError as exc:
            if len(files) == 1:
                raise
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


@cli.command()
@click.option("--config", "config_file", default=None, help="A run's config.yaml to start from.")
@click.option(
    "--space",
    "space",
    multiple=True,
    metavar="KEY=DIST:ARGS",
    help="A setting's distribution: choice/grid (comma list), uniform/loguniform/randint "
    "(low:high), e.g. --space learning_rate=loguniform:1e-4:1e-2 --space loss=choice:ce,ce+dice.",
)
@config_options(TuneSettings)
@config_options(TrainConfig, optional=("data", "out"), skip=("resume", "resume_from"))
@click.pass_context
def tune(ctx: click.Context, config_file: str | None, space: tuple[str, ...], **kw: Any) -> None:
    """Search a training recipe with Ray Tune: each trial a segray training run, ASHA stopping
    the laggards; the best becomes <out>/best, every trial is listed in <out>/trials.csv.

    The training options are the base every trial starts from (--out is the search folder);
    --space flags and --space-file say what the trials vary.
    """
    from segray.io import storage
    from segray.train.driver import load_config
    from segray.train.tune import tune as run_search

    search = from_options(TuneSettings, kw)
    kw.pop("resume", None)
    where = storage.filesystem(config_file, kw.get("endpoint")) if config_file else None
    base = load_config(config_file, where) if config_file else None
    for name in ("resume", "resume_from"):  # the search's --resume, not a trial's
        (base or {}).pop(name, None)
    values = given(ctx, kw) if base is not None else kw
    result = run_search(from_options(TrainConfig, values, base), search, space)
    click.echo(result.table())
    click.echo(f"best: {result.out}/best (trials: {result.out}/trials.csv)")


@cli.command()
@click.option("--config", "config_file", default=None, help="A run's config.yaml to start from.")
@click.option(
    "--augment",
    is_flag=True,
    help="Augment: random flips, quarter turns, brightness and contrast (hue for RGB). Off by "
    "default: on the real datasets of segray bench accuracy it cost held-out IoU at 40 epochs.",
)
@click.option("--no-augment", is_flag=True, help="Turn augmentation off (the default).")
@config_options(TrainConfig, optional=("data", "out"))
@click.pass_context
def train(
    ctx: click.Context, config_file: str | None, augment: bool, no_augment: bool, **kw: Any
) -> None:
    """Train a model on N Ray Train workers and write a run folder.

    With --config, the settings of that file are used, and any option given here overrides them:
    `segray train --config runs/r1/config.yaml --out runs/r2` repeats run r1 into r2.
    """
    from segray.io import storage
    from segray.train.driver import load_config
    from segray.train.driver import train as run_training

    where = storage.filesystem(config_file, kw.get("endpoint")) if config_file else None
    base = load_config(config_file, where) if config_file else None
    values = given(ctx, kw) if base is not None else kw
    if augment and no_augment:
        raise click.UsageError("give --augment or --no-augment, not both")
    if augment:
        values["augment"] = AugmentConfig()
    if no_augment:
        values["augment"] = AugmentConfig.off()
    result = run_training(from_options(TrainConfig, values, base))
    click.echo(result.summary())


@cli.command()
@config_options(DemoConfig)
def demo(**kw: Any) -> None:
    """Run the main job on the embedded default: synthesise, train, bulk-predict, evaluate."""
    from segray.devtools.demo import run_demo

    run_demo(from_options(DemoConfig, kw))


@cli.command()
@config_options(PredictConfig)
def predict(**kw: Any) -> None:
    """Segment a tile collection (or scenes) with Ray Data; write masks and a manifest."""
    from segray.bulk.job import predict as run_predict

    config = from_options(PredictConfig, kw)
    result = run_predict(config)
    if not result.ok:
        raise click.ClickException(
            f"{result.error_rate:.1%} of inputs failed, above --max-error-rate "
            f"{config.max_error_rate:.1%}; see the manifest for each reason"
        )


@cli.command()
@config_options(ServeConfig)
def serve(**kw: Any) -> None:
    """Serve the model over HTTP (POST /v1/segment); the token comes from SEGRAY_API_TOKEN."""
    from segray.models import saving
    from segray.serve.app import run

    config = from_options(ServeConfig, kw)
    config.check_card(saving.vet(config.model_uri, config.fs(config.model_uri)))  # first
    try:
        run(config, blocking=False)
    except RuntimeError as exc:  # Serve's "Deploying application … failed", and why
        reason = " ".join(line.strip() for line in str(exc).splitlines()[-3:] if line.strip())
        raise click.ClickException(f"{config.model_uri} could not be served: {reason}") from None
    # the URL once the app is up: an app that does not deploy never showed one
    root, under = f"http://{config.host}:{config.port}", ", ".join(config.allowed_sources)
    click.echo(f"serving {config.model_uri} on {root} (docs at /docs)")
    where = f"?url=<a GeoTIFF/COG under {under}>" if under else " (no --allow-source: none)"
    click.echo(f"map: {root}/v1/map{where}")
    _block()


def _block(grace_s: float = 60.0) -> None:
    """Serve until interrupted. Ctrl-C shuts down the Ray this process started (or leaves the
    cluster it joined) and ends the process; a shutdown still under way after ``grace_s``
    seconds does not keep it alive (a full run of the tests saw one hang)."""
    import os
    import signal
    import threading
    import time

    import ray

    # Python's own Ctrl-C handler, installed again at the C level: native code started with Ray
    # and Serve may have replaced the process's handler without Python knowing (a full run of
    # the tests saw one Ctrl-C go unanswered for 120 s)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("stopping: shutting down Ray", err=True)
        done = threading.Event()

        def shutdown() -> None:
            ray.shutdown()
            done.set()

        threading.Thread(target=shutdown, name="segray-serve-shutdown", daemon=True).start()
        if not done.wait(grace_s):
            click.echo(f"Ray did not shut down within {grace_s:.0f} s: exiting", err=True)
        os._exit(130)


@cli.group()
def pool() -> None:
    """Named Predictor pools on a running Ray cluster: a model loaded once for many jobs."""


@pool.command("start")
@click.argument("name")
@config_options(PoolConfig)
def pool_start(name: str, **kw: Any) -> None:
    """Start pool NAME (kept if it holds this model already); then: segray predict --pool NAME."""
    import time

    from segray.bulk import pool as pools
    from segray.models import saving
    from segray.runtime import join_cluster

    config = from_options(PoolConfig, kw)
    _pool_name(name)
    saving.vet(config.model, config.fs(config.model))  # before joining a cluster
    join_cluster(config.ray_address)
    start = time.monotonic()
    info = pools.start_pool(name, config)
    click.echo(f"{info.summary()}; ready in {time.monotonic() - start:.1f} s")
    click.echo(f"use it: segray predict --pool {name} --model {config.model} …")


@pool.command("list")
@click.option("--ray-address", default=None, help="A running Ray cluster (default: RAY_ADDRESS).")
def pool_list(ray_address: str | None) -> None:
    """The pools on the cluster: model, version, precision, actors."""
    from segray.bulk import pool as pools
    from segray.runtime import join_cluster

    join_cluster(ray_address)
    found = pools.list_pools()
    for info in found:
        click.echo(info.summary())
    if not found:
        click.echo("no pool on this cluster (segray pool start NAME --model URI)")


@pool.command("stop")
@click.argument("name")
@click.option("--ray-address", default=None, help="A running Ray cluster (default: RAY_ADDRESS).")
def pool_stop(name: str, ray_address: str | None) -> None:
    """End pool NAME's actors."""
    from segray.bulk import pool as pools
    from segray.runtime import join_cluster

    _pool_name(name)
    join_cluster(ray_address)
    count = pools.stop_pool(name)
    if not count:
        raise click.ClickException(f"no pool {name!r} on this cluster (see segray pool list)")
    click.echo(f"pool {name}: {count} actor(s) stopped")


def _pool_name(name: str) -> None:
    try:
        checked_pool_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None


@cli.command("eval")
@config_options(EvalConfig)
def eval_cmd(**kw: Any) -> None:
    """Per-class IoU, Dice, pixel accuracy, confusion matrix and the worst tiles; with
    --vectors, a layer's object-level precision, recall and F1 against --labels."""
    from segray.evaluate.evaluate import evaluate, evaluate_layer, layer_summary
    from segray.io import storage

    config = from_options(EvalConfig, kw)
    if config.vectors:
        click.echo(layer_summary(evaluate_layer(config)))
        return
    doc = evaluate(config)
    report = storage.join(config.report_folder, "report.md")
    click.echo(config.fs(report).read_text(report))
    click.echo(f"report: {report} ({doc['tiles']} tiles)")


from segray.cli.bench import bench  # noqa: E402  (the group's commands need the options above)
from segray.cli.export import export_cmd  # noqa: E402

cli.add_command(bench)
cli.add_command(export_cmd)


def main() -> None:
    """Console-script entry point."""
    from segray import log as segray_log

    segray_log.filter_native_stderr()
    cli(prog_name="segray")


if __name__ == "__main__":
    sys.exit(main())
