"""``segray bench …``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import click

from segray.cli.options import option_for
from segray.serve.config import ServeConfig


@click.group()
def bench() -> None:
    """Benchmarks that print ratios measured side by side in one run."""


@bench.command("train")
@click.option("--tiles", default=160, show_default=True)
@click.option("--size", default=64, show_default=True)
@click.option("--batch-size", "batch", default=16, show_default=True)
@click.option("--epochs", default=4, show_default=True)
@click.option("--base-filters", default=16, show_default=True)
@click.option("--rounds", default=1, show_default=True, help="Rounds of the sides (median).")
@click.option(
    "--sides",
    default="bare,step,ray1_streamed,ray1,ray2",
    show_default=True,
    help="Trainings of each round, in turn: bare, step, ray1_streamed, ray1, ray2.",
)
def bench_train_cmd(
    tiles: int, size: int, batch: int, epochs: int, base_filters: int, rounds: int, sides: str
) -> None:
    """Ray Train (1 and 2 workers) against bare Keras and segray's step alone."""
    from segray.devtools.bench.train import bench_train

    chosen = tuple(s.strip() for s in sides.split(",") if s.strip())
    try:
        bench_train(tiles, size, batch, epochs, base_filters, rounds, chosen, echo=click.echo)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@bench.command("predict")
@click.option(
    "--tiles",
    "sizes",
    default="64:4000,256:300",
    show_default=True,
    help="Tile size and count pairs, px:count.",
)
@click.option("--s3/--no-s3", default=True, show_default=True, help="Also S3 → S3 (moto server).")
@click.option("--rss-tiles", default="1000,10000", show_default=True, help="Driver RSS at these.")
@click.option("--repeats", default=3, show_default=True, help="Job runs per case (median).")
@click.option("--loop-tiles", default=600, show_default=True, help="Tiles the plain loop does.")
@click.option("--concurrency", default=1, show_default=True, help="Predictor actors.")
def bench_predict_cmd(
    sizes: str, s3: bool, rss_tiles: str, repeats: int, loop_tiles: int, concurrency: int
) -> None:
    """A bulk job against a plain loop and the model alone, at 64 and 256 px, local and S3."""
    from segray.devtools.bench.predict import bench_predict

    try:
        pairs = [tuple(int(v) for v in pair.split(":")) for pair in sizes.split(",")]
        counts = [int(c) for c in rss_tiles.split(",") if c]
    except ValueError:
        raise click.BadParameter("give px:count pairs and counts as integers") from None
    bench_predict(
        pairs,  # type: ignore[arg-type]
        s3=s3,
        rss_tiles=counts,
        repeats=repeats,
        loop_tiles=loop_tiles,
        job={"concurrency": concurrency},
        echo=click.echo,
    )


@bench.command("scenes")
@click.option("--size", default=4096, show_default=True, help="Scene side in pixels.")
@click.option("--scenes", default=8, show_default=True, help="Scenes of the all-at-once job.")
@click.option("--window", default=512, show_default=True, help="Window side in pixels.")
@click.option("--repeats", default=1, show_default=True, help="Runs of each job (median).")
@click.option("--concurrency", default=1, show_default=True, help="Predictor actors.")
@click.option("--scenes-at-once", default=None, type=int, help="Scene tasks at once.")
def bench_scenes_cmd(
    size: int, scenes: int, window: int, repeats: int, concurrency: int, scenes_at_once: int | None
) -> None:
    """Scenes stitched in parallel off the driver against one at a time, with peak RSS."""
    from segray.devtools.bench.scenes import bench_scenes

    job: dict = {"concurrency": concurrency}
    if scenes_at_once is not None:
        job["scenes_at_once"] = scenes_at_once
    bench_scenes(size, scenes, window, repeats=repeats, job=job, echo=click.echo)


@bench.command("chips")
@click.option("--scenes", default="1,4", show_default=True, help="Scene counts to compare.")
@click.option("--size", default=4096, show_default=True, help="Scene side in pixels.")
@click.option("--store-mib", default=96, show_default=True, help="Object store of each run.")
@click.option("--chips", default=256, show_default=True, help="Chips of the one epoch.")
def bench_chips_cmd(scenes: str, size: int, store_mib: int, chips: int) -> None:
    """Training from scenes: object store peak and peak RSS against the scene count."""
    from segray.devtools.bench.chips import bench_chips

    counts = tuple(int(v) for v in scenes.split(","))
    bench_chips(counts, size, chips=chips, store_mib=store_mib, echo=click.echo)


@bench.command("plan")
@click.option("--keys", default=1_000_000, show_default=True, help="Simulated inputs.")
def bench_plan_cmd(keys: int) -> None:
    """A job's planning step over a simulated listing: time and driver peak RSS."""
    from segray.devtools.bench.scale import bench_plan

    bench_plan(keys, echo=click.echo)


@bench.command("serve")
@click.option("--model", default=None, help="Model URI (default: untrained 128 px U-Net).")
@click.option("--requests", default=200, show_default=True, help="Requests per level.")
@click.option("--concurrency", default="1,4,16", show_default=True)
@option_for("max_batch_size", ServeConfig.model_fields["max_batch_size"])
@click.option("--batch-wait-ms", type=float, default=None, help="Default: segray serve's.")
@click.option("--ceiling-seconds", default=5.0, show_default=True)
@click.option(
    "--ingress",
    default="proxy,haproxy",
    show_default=True,
    help="Ingresses to compare, each with its own Ray (segray serve --ingress).",
)
@click.option("--rounds", default=1, show_default=True, help="Rounds; figures are medians.")
def bench_serve_cmd(
    model: str | None,
    requests: int,
    concurrency: str,
    max_batch_size: int,
    batch_wait_ms: float | None,
    ceiling_seconds: float,
    ingress: str,
    rounds: int,
) -> None:
    """Serve throughput and latency at 1/4/16 clients, batching on and off, per ingress, vs the
    model's ceiling."""
    from segray.devtools.bench.serve import bench_serve

    bench_serve(
        model_uri=model,
        requests_per_level=requests,
        concurrencies=tuple(int(c) for c in concurrency.split(",")),
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=None if batch_wait_ms is None else batch_wait_ms / 1000,
        ceiling_seconds=ceiling_seconds,
        ingresses=tuple(i.strip() for i in ingress.split(",") if i.strip()),
        rounds=rounds,
        echo=click.echo,
    )


@bench.command("vectors")
@click.option("--tiles", default="1000,10000", show_default=True, help="Tile counts to compare.")
def bench_vectors_cmd(tiles: str) -> None:
    """The vector layer's merge against its tracing, with driver and worker peak RSS."""
    from segray.devtools.bench.vectors import bench_vectors

    bench_vectors(tuple(int(v) for v in tiles.split(",") if v), echo=click.echo)


@bench.command("tiles")
@click.option("--scene-size", default=1024, show_default=True, help="Scene side in pixels.")
@click.option("--model-size", default=128, show_default=True, help="Model input in pixels.")
def bench_tiles_cmd(scene_size: int, model_size: int) -> None:
    """Map tiles through Serve (cold, warm, 16 clients) against read + model and rio-tiler."""
    from segray.devtools.bench.tiles import bench_tiles

    bench_tiles(scene_size, model_size, echo=click.echo)


@bench.command("precision")
@click.option("--model", "model_uri", default=None, help="Model (default: a 128 px U-Net).")
@click.option("--data", default=None, help="Labelled tiles: mIoU in each precision.")
@click.option("--precisions", default="fp32,bf16", show_default=True, help="fp32 first.")
@click.option("--windows", default=128, show_default=True, help="Windows per round.")
@click.option("--batch-size", "batch", default=16, show_default=True, help="Windows per call.")
@click.option("--repeats", default=5, show_default=True, help="Rounds (median).")
@click.option("--xla/--no-xla", default=True, show_default=True, help="Also with XLA on.")
@click.option("--train-tiles", default=64, show_default=True, help="0: no training rows.")
def bench_precision_cmd(
    model_uri: str | None,
    data: str | None,
    precisions: str,
    windows: int,
    batch: int,
    repeats: int,
    xla: bool,
    train_tiles: int,
) -> None:
    """fp32 against bf16/fp16: predict and train speed, XLA off and on, and accuracy."""
    from segray.devtools.bench.precision import bench_precision
    from segray.models.precision import PRECISIONS

    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    if not chosen or chosen[0] != "fp32" or not set(chosen) <= set(PRECISIONS):
        raise click.BadParameter(f"fp32 first, then any of {', '.join(PRECISIONS)}")
    bench_precision(
        model_uri, data, chosen, windows, batch, repeats, xla, train_tiles, echo=click.echo
    )


@bench.command("startup")
@click.option("--tiles", default=200, show_default=True, help="Tiles of each job.")
@click.option("--size", default=64, show_default=True, help="Tile and model size in pixels.")
@click.option("--repeats", default=3, show_default=True, help="Runs of each side (median).")
@click.option(
    "--runtimes", default="keras,onnx", show_default=True, help="Model runtimes of the sides."
)
def bench_startup_cmd(tiles: int, size: int, repeats: int, runtimes: str) -> None:
    """Seconds to a job's first mask as whole processes: from nothing, on a running cluster, on
    a pool, with each model runtime, against a plain loop."""
    from segray.devtools.bench.startup import bench_startup

    bench_startup(tiles, size, repeats, echo=click.echo, runtimes=_listed(runtimes))


def _listed(text: str) -> tuple[str, ...]:
    """A comma-separated option's items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


@bench.command("accuracy")
@click.option(
    "--datasets",
    default="nc-water,vegas-roads,osbs-trees",
    show_default=True,
    help="Real datasets of tests/data/real: nc-water, vegas-roads, osbs-trees.",
)
@click.option(
    "--sides",
    default="keras,segray-1w,segray-2w",
    show_default=True,
    help="keras (plain fit, the anchor), segray-1w, segray-2w.",
)
@click.option("--seeds", default=3, show_default=True, help="Seeds per side (median).")
@click.option(
    "--first-seed", default=0, show_default=True, help="The first seed (seeds run on from it)."
)
@click.option("--epochs", default=40, show_default=True)
@click.option("--batch-size", "batch", default=16, show_default=True)
@click.option("--base-filters", default=16, show_default=True, help="The U-Net's width.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="A training setting over segray's defaults (segray sides), e.g. --set monitor=val_miou.",
)
@click.option(
    "--tta",
    type=click.Choice(["none", "flips", "d4"]),
    default="none",
    show_default=True,
    help="Test-time augmentation of every side's held-out predictions.",
)
def bench_accuracy_cmd(
    datasets: str,
    sides: str,
    seeds: int,
    first_seed: int,
    epochs: int,
    batch: int,
    base_filters: int,
    sets: tuple[str, ...],
    tta: str,
) -> None:
    """segray's training against a plain Keras fit: rare-class IoU on held-out real tiles."""
    from segray.devtools.bench.accuracy import bench_accuracy, parse_sets

    names, chosen = _listed(datasets), _listed(sides)
    try:
        overrides = parse_sets(sets)
        bench_accuracy(
            names,
            chosen,
            seeds,
            epochs,
            batch,
            base_filters,
            overrides,
            tta,
            first_seed=first_seed,
            echo=click.echo,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@bench.command("recipe")
@click.option("--targets", default="water,shrubland", show_default=True, help="Rare targets.")
@click.option("--seeds", default=3, show_default=True, help="Seeds per recipe (median).")
@click.option("--epochs", default=30, show_default=True)
@click.option("--batch-size", "batch", default=16, show_default=True)
@click.option("--recipes", default=None, help="Recipe keys, comma-separated (default: all).")
@click.option("--quick", is_flag=True, help="Water, 1 seed, 2 epochs: the anchor and the default.")
def bench_recipe_cmd(
    targets: str, seeds: int, epochs: int, batch: int, recipes: str | None, quick: bool
) -> None:
    """Recipes for a rare class on real Landsat tiles: held-out IoU against plain Keras."""
    from segray.devtools.bench.recipe import QUICK, RECIPES, TARGETS, bench_recipe

    chosen = [r.strip() for r in recipes.split(",") if r.strip()] if recipes else None
    names = [t.strip() for t in targets.split(",") if t.strip()]
    keys = {r.key for r in RECIPES}
    if set(names) - set(TARGETS) or set(chosen or ()) - keys:
        raise click.BadParameter(
            f"targets: any of {', '.join(TARGETS)}; recipes: any of {', '.join(sorted(keys))}"
        )
    if quick:
        bench_recipe(**QUICK, batch=batch, echo=click.echo)  # type: ignore[arg-type]
    else:
        bench_recipe(names, seeds, epochs, batch, chosen, echo=click.echo)


@bench.command("tune")
@click.option(
    "--datasets",
    default="vegas-roads,nc-water",
    show_default=True,
    help="Real datasets of tests/data/real: nc-water, vegas-roads, osbs-trees.",
)
@click.option(
    "--sides",
    default="default,asha,to-end",
    show_default=True,
    help="default (segray train), asha (segray tune), to-end (the same trials, none stopped).",
)
@click.option("--trials", default=16, show_default=True, help="Trials of each search.")
@click.option("--epochs", default=30, show_default=True, help="Epochs of each run and trial.")
@click.option("--grace-epochs", "grace", default=4, show_default=True, help="ASHA's grace.")
@click.option("--batch-size", "batch", default=16, show_default=True)
@click.option("--base-filters", default=16, show_default=True, help="The U-Net's width.")
@click.option("--seed", default=0, show_default=True, help="Seed of the runs and the draws.")
@click.option(
    "--space-file",
    default=None,
    help="YAML search space (default: learning rate, loss, class balance, schedule, batch).",
)
def bench_tune_cmd(
    datasets: str,
    sides: str,
    trials: int,
    epochs: int,
    grace: int,
    batch: int,
    base_filters: int,
    seed: int,
    space_file: str | None,
) -> None:
    """A recipe search against segray's defaults on held-out real tiles, and ASHA's saving."""
    from segray.devtools.bench.search import bench_tune
    from segray.train.space import load_space

    names, chosen = _listed(datasets), _listed(sides)
    space = load_space(space_file) if space_file else None
    try:
        bench_tune(
            names,
            chosen,
            trials,
            epochs,
            grace,
            batch,
            base_filters,
            seed,
            space,
            echo=click.echo,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
