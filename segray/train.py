"""Distributed training on Ray Train: the driver side.

``train(config)`` checks everything it can before a worker starts (model name and size, the
dataset's files and class ids, batch size against workers), builds the ``TensorflowTrainer``, and
after the run writes the run folder: ``model.keras`` + ``model.json`` (the best epoch), ``last/``,
``metrics.csv`` and ``curves.png``. The per-worker loop lives in :mod:`segray.trainloop`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from segray import storage
from segray.augment import AugmentConfig

OPTIMIZERS = ("adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "step")
MONITOR_MODES = {"val_miou": "max", "val_loss": "min", "val_pixel_accuracy": "max", "loss": "min"}


class TrainError(ValueError):
    """A training configuration refused before any worker starts; the message says what to fix."""


@dataclass
class TrainConfig:
    """Settings of one training run; defaults train a small U-Net on a laptop."""

    data: str
    out: str
    layout: str = "paired"
    model: str = "unet"
    encoder: str | None = None
    weights: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 2
    class_names: list[str] | None = None
    size: int = 128
    bands: tuple[int, ...] | None = None
    palette: str | None = None
    epochs: int = 20
    batch_size: int = 16
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    schedule: str = "constant"
    step_epochs: int = 10
    step_gamma: float = 0.1
    loss: str = "ce+dice"
    class_weights: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    monitor: str = "val_miou"
    patience: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    endpoint: str | None = None
    resume: bool = False
    resume_from: str | None = None
    max_failures: int = 2
    limit: int | None = None
    #: Test-only switches: per-rank diagnostics files, and one injected worker crash at an epoch.
    diagnostics: bool = False
    fail_at_epoch: int | None = None

    def per_worker_batch(self) -> int:
        """Samples each worker takes per step; the global batch is this × workers."""
        return self.batch_size // self.workers

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the field and the allowed values."""
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("monitor", self.monitor, tuple(MONITOR_MODES))
        if self.workers < 1:
            raise TrainError(f"workers must be ≥ 1; got {self.workers}")
        if self.batch_size < self.workers:
            raise TrainError(
                f"batch size {self.batch_size} is smaller than the number of workers "
                f"{self.workers}: each worker needs at least one sample per step"
            )
        if self.batch_size % self.workers:
            lo = self.batch_size - self.batch_size % self.workers
            raise TrainError(
                f"batch size {self.batch_size} is not a multiple of workers {self.workers}; "
                f"use {lo} or {lo + self.workers}"
            )
        if self.epochs < 1:
            raise TrainError(f"epochs must be ≥ 1; got {self.epochs}")
        if self.num_classes < 2:
            raise TrainError(f"classes must be ≥ 2 (background counts); got {self.num_classes}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise TrainError(f"{name} must be one of {allowed}; got {value!r}")


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
    fs = storage.s3_filesystem(config.endpoint) if storage.is_s3(config.out) else None
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=config.monitor,
            checkpoint_score_order=MONITOR_MODES[config.monitor],
        ),
    )


def _has_checkpoints(config: TrainConfig) -> bool:
    return any(
        u.endswith("state.json")
        for u in storage.list_files(config.out, pattern="*state.json", endpoint=config.endpoint)
    )


def _model_card(config: TrainConfig, channels: int, dtype_scale: float) -> dict[str, Any]:
    from segray import models

    info = models.model_info(config.model, encoder=config.encoder)
    return {
        "name": config.model,
        "num_classes": config.num_classes,
        "input_shape": [config.size, config.size, channels],
        "class_names": config.class_names,
        "encoder": config.encoder,
        "options": config.model_options,
        "bands": list(config.bands) if config.bands else None,
        "scale": dtype_scale,
        "input_multiple": int(info["output_stride"]),
    }


def prepare(config: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Every check that can run on the driver; returns (train ds, val ds, loop config).

    Raises :class:`TrainError`, ``ModelError`` or ``DatasetError`` naming the problem.
    """
    from segray import datasets, imagery, models

    config.validate()
    models.model_info(config.model, encoder=config.encoder)  # unknown names fail here, at once
    if config.resume and config.resume_from:
        raise TrainError("give either --resume (this run's latest checkpoint) or --resume-from")
    exists = _has_checkpoints(config)
    if exists and not config.resume:
        raise TrainError(
            f"{config.out} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose a new --out"
        )
    if config.resume and not exists:
        raise TrainError(f"--resume: no checkpoint found under {config.out}")
    spec = datasets.DatasetSpec(
        config.data,
        config.layout,
        num_classes=config.num_classes,
        size=config.size,
        bands=config.bands,
        palette=config.palette,
        val_fraction=config.val_fraction,
        seed=config.seed,
        endpoint=config.endpoint,
        limit=config.limit,
    )
    train_ds, val_ds, info = datasets.load_splits(spec)
    channels = info.image_shape[2]
    model = models.build_model(
        config.model,
        config.num_classes,
        (config.size, config.size, channels),
        encoder=config.encoder,
        weights=config.weights,
        **config.model_options,
    )
    scale = imagery.default_scale(train_ds.take(1)[0]["image"].dtype)
    n_val = 0 if val_ds is None else val_ds.count()
    loop = {
        "config": dataclasses.asdict(config),
        "card": _model_card(config, channels, scale),
        "params": int(model.count_params()),
        "train_count": info.count - n_val,
        "val_count": n_val,
    }
    del model
    return train_ds, val_ds, loop


def pad_to_multiple(ds: Any, multiple: int, seed: int) -> Any:
    """Append weight-0 copies of rows so the row count is a multiple of ``multiple``.

    Ray Train's equal split then hands every worker the same number of full batches without
    dropping a row: every real sample is used exactly once per epoch, padding counts for nothing.
    """
    ds = ds.map_batches(_with_weight(1.0), batch_format="numpy").materialize()
    count = ds.count()
    missing = (-count) % multiple
    if missing == 0:
        return ds
    copies = [ds] * math.ceil(missing / count)
    pad = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
    pad = pad.random_shuffle(seed=seed).limit(missing)
    return ds.union(pad.map_batches(_with_weight(0.0), batch_format="numpy")).materialize()


def _with_weight(value: float) -> Any:
    import numpy as np

    def add(batch: dict[str, Any]) -> dict[str, Any]:
        batch["weight"] = np.full(len(batch["id"]), value, np.float32)
        return batch

    return add


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.workers`` Ray Train workers and write the run folder."""
    from ray.train import ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from segray.runtime import init_ray
    from segray.trainloop import train_loop

    init_ray()
    start = time.monotonic()
    train_ds, val_ds, loop = prepare(config)
    global_batch = config.per_worker_batch() * config.workers
    datasets = {"train": pad_to_multiple(train_ds, global_batch, config.seed)}
    if val_ds is not None:
        datasets["val"] = pad_to_multiple(val_ds, global_batch, config.seed)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=_run_config(config),
        datasets=datasets,
    )
    print(
        f"segray train: {config.model} ({loop['params']:,} params) on {config.workers} worker(s), "
        f"{loop['train_count']} train / {loop['val_count']} val tiles, global batch {global_batch}"
    )
    result = trainer.fit()
    return _finish(config, result, time.monotonic() - start)


def _finish(config: TrainConfig, result: Any, seconds: float) -> TrainResult:
    """Copy the best and last checkpoints into the run folder; write metrics.csv and curves."""
    if result.error is not None:
        raise result.error
    last = result.checkpoint
    best_ckpt, _ = max(
        result.best_checkpoints,
        key=lambda cm: _score(cm[1], config.monitor),
    )
    state = _read_state(last)
    history = state["history"]
    ep = config.endpoint
    _copy_checkpoint(best_ckpt, config.out, ep)
    _copy_checkpoint(last, storage.join(config.out, "last"), ep)
    storage.write_text(storage.join(config.out, "metrics.csv"), _history_csv(history), endpoint=ep)
    storage.write_bytes(storage.join(config.out, "curves.png"), plot_curves(history), endpoint=ep)
    best_state = _read_state(best_ckpt)
    best = history[best_state["epoch"] - 1] if history else {}
    return TrainResult(
        out=config.out,
        epochs_run=len(history),
        starts=state["starts"],
        best_epoch=best_state["epoch"],
        best=best,
        history=history,
        seconds=seconds,
    )


def _score(metrics: dict[str, Any], monitor: str) -> float:
    value = float(metrics.get(monitor, math.nan))
    if math.isnan(value):
        return -math.inf
    return value if MONITOR_MODES[monitor] == "max" else -value


def _read_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as folder, open(f"{folder}/state.json") as f:
        return json.load(f)


def _copy_checkpoint(checkpoint: Any, dest: str, endpoint: str | None) -> None:
    from segray.modelio import CARD_FILE, MODEL_FILE

    with checkpoint.as_directory() as folder:
        for name in (MODEL_FILE, CARD_FILE):
            with open(f"{folder}/{name}", "rb") as f:
                storage.write_bytes(storage.join(dest, name), f.read(), endpoint=endpoint)


def _history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    keys = list(history[0]) if history else ["epoch"]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def plot_curves(history: list[dict[str, float]]) -> bytes:
    """``curves.png``: training and validation loss, and validation mean IoU, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="loss")
    if history and "val_loss" in history[0]:
        ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
        ax2.plot(epochs, [h["val_miou"] for h in history], "o-", color="C2", label="val mIoU")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
