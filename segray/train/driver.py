"""Distributed training on Ray Train: the driver side.

``train(config)`` checks everything it can before a worker starts (model name and size, the
dataset's files and class ids, batch size against workers), saves ``config.yaml`` in the run
folder, builds the trainer (:mod:`segray.train.backend`), shows progress while the workers
train, and after the run writes the run folder: ``model.keras`` + ``model.json`` (the best
epoch), ``last/``, ``metrics.csv`` and ``curves.png``. The per-worker loop lives in
:mod:`segray.train.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from segray.errors import ConfigError, DatasetError
from segray.inference import export
from segray.io import storage
from segray.io.files import FileSystem
from segray.models.saving import ModelCard
from segray.train import checkpoints
from segray.train.config import TrainConfig, monitor_mode
from segray.train.data import DatasetInfo
from segray.train.feed import ChipFeed, TileFeed, scene_feed, tile_feed
from segray.train.history import history_csv, plot_curves
from segray.train.loop import LoopPlan

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


@dataclass
class TrainResult:
    """What a run produced: where, how far it got, and its metrics per epoch."""

    out: str
    epochs_run: int
    starts: list[int]
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    epochs: int = 0
    #: Per resumed start: the checkpoint it went on from and the newer ones passed over (why).
    restored: list[dict[str, Any]] = field(default_factory=list)
    #: The metric that picked the best epoch.
    monitor: str = "val_miou"
    #: With --tracking-uri: the MLflow run id and the registered model version (name/version).
    mlflow_run: str | None = None
    mlflow_model: str | None = None

    def summary(self) -> str:
        """A line or two for people: what ran, the best epoch, where the run folder is."""
        best = self.best
        val = f", val mIoU {best['val_miou']:.3f}" if "val_miou" in best else ""
        if self.monitor in best and self.monitor not in ("val_miou", "loss"):
            val += f", {self.monitor} {best[self.monitor]:.3f}"
        if "val_threshold" in best:
            val += f" at threshold {best['val_threshold']:.2f}"
        loss = f"loss {best['loss']:.4f}" if "loss" in best else ""
        stopped = ""
        if self.epochs and self.epochs_run < self.epochs:
            stopped = f" (stopped early: no better for {self.epochs_run - self.best_epoch} epochs)"
        resumed = ""
        if self.restored:
            last = self.restored[-1]
            resumed = f"resumed from {last['from']}"
            if last["passed_over"]:
                resumed += f" (passed over: {'; '.join(last['passed_over'])})"
            resumed += "\n"
        tracked = ""
        if self.mlflow_model:
            tracked = f"\nMLflow: run {self.mlflow_run}, model {self.mlflow_model}"
        return (
            resumed
            + (
                f"trained epochs {self.starts[-1]}..{self.epochs_run} in {self.seconds:.0f} s"
                f"{stopped}; best epoch {self.best_epoch}: {loss}{val}\n"
                f"run folder: {self.out} "
                "(model.keras, model.json, config.yaml, metrics.csv, curves.png)"
            )
            + tracked
        )


def _run_paths(out: str) -> tuple[str, str]:
    """``(storage_path, name)`` for Ray Train's RunConfig from a run URI (S3: ``bucket/prefix``)."""
    loc = storage.parse(out)
    parent, _, name = loc.path.rstrip("/").rpartition("/")
    if loc.scheme == "s3":
        return f"{loc.bucket}/{parent}".rstrip("/"), name
    return parent or "/", name


def _run_config(config: TrainConfig) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_path, name = _run_paths(config.out)
    out = config.fs(config.out)
    fs = out.arrow(config.out)[0] if out.scheme != "file" else None
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=config.monitor,
            checkpoint_score_order=monitor_mode(config.monitor),
        ),
    )


def _model_card(config: TrainConfig, channels: int, data: DatasetInfo) -> ModelCard:
    from segray import models
    from segray.io import bands

    info = models.model_info(config.model, encoder=config.encoder)
    method = bands.default_method(data.dtype) if config.normalize == "auto" else config.normalize
    if method != "scale" and data.stats is None:
        raise DatasetError(f"--normalize {method}: the training set has no valid pixel")
    options = dict(config.model_options)
    if info["encoder"] and "input_range" not in options:  # the backbone's preprocessing reads it
        options["input_range"] = "standard" if method == "stats" else "unit"
    return ModelCard(
        name=config.model,
        num_classes=config.num_classes,
        input_shape=(config.size, config.size, channels),
        class_names=list(config.class_names) if config.class_names else None,
        encoder=config.encoder,
        options=options,
        bands=config.bands,
        normalize=method,
        scale=bands.default_scale(data.dtype),
        stats=data.stats,
        dtype=data.dtype,
        nodata=config.nodata,
        ignore_index=config.ignore_index,
        input_multiple=int(info["output_stride"]),
        precision=config.compute_precision(),
        threshold=0.5 if config.threshold is None else config.threshold,
    )


def _check_run_folder(config: TrainConfig) -> None:
    exists = checkpoints.has_checkpoints(config.out, config.fs(config.out))
    if exists and not config.resume:
        raise ConfigError(
            f"{config.out} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose a new --out"
        )
    if config.resume and not exists:
        raise ConfigError(f"--resume: no checkpoint found under {config.out}")
    if config.resume:  # on the driver, before any worker: one line when nothing can be restored
        good, passed = checkpoints.check_resume(config.out, config.fs(config.out))
        if passed:
            log.warning("--resume: going on from %s; passed over: %s", good, "; ".join(passed))


def prepare(config: TrainConfig) -> LoopPlan:
    """Every check that can run on the driver (the data read once, none kept); returns the loop
    plan, whose ``feed`` tells each worker what to stream and whose ``config`` holds the class
    weights the run trains with (:func:`balanced`).

    Raises :class:`~segray.errors.SegrayError` kinds (config, model, dataset) naming the problem.
    """
    from segray import models
    from segray.datasets.labels import DatasetSpec
    from segray.train import losses

    models.model_info(config.model, encoder=config.encoder)  # unknown names fail here, at once
    try:
        losses.build_loss(config.loss, config.num_classes, config.class_weights)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from exc
    _check_run_folder(config)
    spec = DatasetSpec(
        root=config.data or config.stac or "",
        layout=config.layout,
        num_classes=config.num_classes,
        size=config.size,
        bands=config.bands,
        palette=config.palette,
        val_fraction=config.val_fraction,
        seed=config.seed,
        endpoint=config.endpoint,
        limit=config.limit,
        nodata=config.nodata,
        ignore_index=config.ignore_index,
        labels=config.labels,
        stac=config.stac,
        asset=config.asset,
        class_field=config.class_field,
        val_split=config.val_split,
        block_size=config.block_size,
    )
    global_batch = config.per_worker_batch() * config.workers
    feed: ChipFeed | TileFeed
    if config.layout == "scenes":
        feed, info = scene_feed(
            spec, config.chips_per_epoch, global_batch, config.positive_fraction
        )
    else:
        feed, info = tile_feed(spec, global_batch, config.cache_mib * 2**20)
    config = balanced(config, info)
    channels = info.image_shape[2]
    card = _model_card(config, channels, info)
    model = models.build_model(
        config.model,
        config.num_classes,
        (config.size, config.size, channels),
        encoder=config.encoder,
        weights=config.weights,
        **card.options,
    )
    return LoopPlan(
        config=config,
        card=card,
        params=int(model.count_params()),
        train_count=feed.train_count,
        val_count=feed.val_total,
        feed=feed,
    )


def balanced(config: TrainConfig, info: DatasetInfo) -> TrainConfig:
    """The config with the class weights the run trains with: a two-class run given none weighs
    each class by its share of the training pixels to the power ``-class_balance``
    (:func:`~segray.train.losses.frequency_weights`); ``segray bench recipe`` measured why."""
    from segray.train import losses

    if config.class_weights is not None or config.num_classes != 2 or not config.class_balance:
        return config
    counts = (info.training_class_pixels() + [0, 0])[:2]
    if not all(counts):  # one class alone: nothing to balance
        return config
    weights = losses.frequency_weights(counts, config.class_balance)
    log.info(
        "class weights %s: training pixels %.2f%% class 1, class balance %g",
        ", ".join(f"{w:g}" for w in weights),
        100 * counts[1] / sum(counts),
        config.class_balance,
    )
    return config.replace(class_weights=weights)


def save_config(config: TrainConfig) -> str:
    """Write the run's whole config as ``<out>/config.yaml``; returns its URI."""
    uri = storage.join(config.out, CONFIG_FILE)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    config.fs(uri).write_text(uri, text)
    return uri


def load_config(uri: str, fs: FileSystem | None = None) -> dict[str, Any]:
    """The settings saved in a run's ``config.yaml`` (a file, or the run folder holding one)."""
    if not uri.endswith((".yaml", ".yml")):
        uri = storage.join(uri, CONFIG_FILE)
    try:
        doc = yaml.safe_load((fs or storage.filesystem(uri)).read_text(uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{uri}: expected a mapping of settings, got {type(doc).__name__}")
    return doc


def train(
    config: TrainConfig,
    on_epochs: Callable[[list[dict[str, float]]], None] | None = None,
    local_ray: bool | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.workers`` Ray Train workers and write the run folder;
    each finished epoch's metrics also go to ``on_epochs`` (``segray tune`` reports them).
    ``local_ray`` says the Ray is a one-machine instance of segray's own when this process did
    not start it (:func:`segray.runtime.train_env`)."""
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from segray.runtime import init_ray, train_env
    from segray.train import tracking
    from segray.train.backend import MultiWorkerConfig
    from segray.train.loop import train_loop
    from segray.train.progress import Board, follow

    init_ray()
    start = time.monotonic()
    plan = prepare(config)  # the data stay where they are: each worker streams its share
    config = plan.config  # with the class weights it resolved
    save_config(config)
    tracker = tracking.tracker_for(config.tracking_uri, config.experiment, config.registered_model)
    if tracker is not None:
        tags = {"segray.out": config.out, "segray.model": config.model}
        tracker.start(_run_paths(config.out)[1], config.to_dict(), tags)
    global_batch = config.per_worker_batch() * config.workers
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    board = Board.remote()
    trainer = DataParallelTrainer(  # TensorflowTrainer's work, TensorFlow on the workers only
        train_loop,
        train_loop_config={"plan": dataclasses.replace(plan, board=board)},
        backend_config=MultiWorkerConfig(),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=_run_config(config),
    )
    log.info(
        "training %s (%s params) on %d worker(s): %d train / %d val tiles, global batch %d",
        config.model,
        f"{plan.params:,}",
        config.workers,
        plan.train_count,
        plan.val_count,
        global_batch,
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the driver's own thread below
            outcome["error"] = exc

    runner = threading.Thread(target=fit, name="segray-train-fit", daemon=True)
    with train_env(local_ray):
        runner.start()
        follow(board, runner, config.epochs, _both(tracker.epochs if tracker else None, on_epochs))
    try:
        if "error" in outcome:
            raise outcome["error"]
        result = _finish(config, outcome["result"], time.monotonic() - start)
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise
    if tracker is not None:
        tracker.epochs(result.history)  # any the board had not shown yet
        summary = {"best_epoch": result.best_epoch, "monitor": result.monitor}
        result.mlflow_model = tracker.finish(config.out, config.fs(config.out), summary)
        result.mlflow_run = tracker.run_id if result.mlflow_model else None
    return result


def _both(*hooks: Callable[[list[dict[str, float]]], None] | None) -> Any:
    """One epoch hook calling each of ``hooks`` that is set (None when none is)."""
    chosen = [hook for hook in hooks if hook is not None]
    if not chosen:
        return None
    return lambda rows: [hook(rows) for hook in chosen]


def _finish(config: TrainConfig, result: Any, seconds: float) -> TrainResult:
    """Copy the best and last checkpoints into the run folder; write metrics.csv and curves."""
    if result.error is not None:
        raise result.error
    last = result.checkpoint
    best_ckpt, _ = max(
        result.best_checkpoints,
        key=lambda cm: _score(cm[1], config.monitor),
    )
    state = checkpoints.read_state(last)
    history = state["history"]
    out = config.fs(config.out)
    checkpoints.copy_checkpoint(best_ckpt, config.out, out)
    export.write_run_item(config.out, out)  # the STAC MLM item of the run's model
    checkpoints.copy_checkpoint(last, storage.join(config.out, "last"), out)
    out.write_text(storage.join(config.out, "metrics.csv"), history_csv(history))
    out.write_bytes(storage.join(config.out, "curves.png"), plot_curves(history, config.monitor))
    best_state = checkpoints.read_state(best_ckpt)
    best = history[best_state["epoch"] - 1] if history else {}
    return TrainResult(
        out=config.out,
        epochs_run=len(history),
        starts=state["starts"],
        restored=state.get("restored", []),
        best_epoch=best_state["epoch"],
        best=best,
        history=history,
        seconds=seconds,
        epochs=config.epochs,
        monitor=config.monitor or "val_miou",
    )


def _score(metrics: dict[str, Any], monitor: str) -> float:
    value = float(metrics.get(monitor, math.nan))
    if math.isnan(value):
        return -math.inf
    return value if monitor_mode(monitor) == "max" else -value
