"""The per-worker training loop that Ray Train runs on every worker.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` inside Ray Train ("Attempt to
convert a value (PerReplica…)", ray-project/ray#47464, keras-team/keras#20585), so the step is
written out: ``strategy.run`` of a ``GradientTape`` step, the loss summed over the worker's samples
and divided by the sample count of the *global* batch (``tf.nn.compute_average_loss``), and
``optimizer.apply_gradients``, whose cross-replica gradient sum keeps every replica identical.
Each worker streams its share of each epoch (:mod:`segray.train.feed`); padding rows (weight 0)
count for nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.io import storage
from segray.train import checkpoints
from segray.train.augment import Photometry, augment_batch
from segray.train.config import TrainConfig, monitor_mode
from segray.train.progress import StepPoster, post_epoch

if TYPE_CHECKING:
    from segray.models.saving import ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopPlan:
    """What every worker's loop is handed: the run's settings, the card of the model it trains,
    how many samples there are, and where to post progress (a :class:`~segray.train.progress.Board`
    actor, or None)."""

    config: TrainConfig
    card: ModelCard
    params: int
    train_count: int
    val_count: int
    board: Any = None
    feed: Any = None  # a segray.train.feed TileFeed or ChipFeed: what each worker streams


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, precision: str = "fp32") -> Any:
    """The optimiser with its learning-rate schedule; under fp16, wrapped in Keras's dynamic
    loss scaling (float16 gradients underflow without it; bfloat16 has float32's range)."""
    import keras

    lr: Any = cfg.learning_rate
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total, alpha=0.01)
    elif cfg.schedule == "step":
        lr = keras.optimizers.schedules.ExponentialDecay(
            lr, cfg.step_epochs * steps_per_epoch, cfg.step_gamma, staircase=True
        )
    if cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=cfg.momentum)
    elif cfg.optimizer == "rmsprop":
        optimizer = keras.optimizers.RMSprop(lr)
    else:
        optimizer = keras.optimizers.Adam(lr)
    return keras.optimizers.LossScaleOptimizer(optimizer) if precision == "fp16" else optimizer


class Steps:
    """The compiled distributed train and validation steps of one model."""

    def __init__(
        self,
        strategy: Any,
        model: Any,
        optimizer: Any,
        loss: Any,
        classes: int,
        global_batch: int,
        thresholds: tuple[float, ...] = (0.5,),
    ) -> None:
        import tensorflow as tf

        from segray import metrics

        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        sum_ = tf.distribute.ReduceOp.SUM

        def global_count(w: Any) -> Any:
            ctx = tf.distribute.get_replica_context()
            return tf.maximum(ctx.all_reduce(sum_, tf.reduce_sum(w)), 1.0)

        def train_step(x: Any, y: Any, w: Any) -> Any:
            with tf.GradientTape() as tape:
                per_sample = loss(y, model(x, training=True))
                # Average over the real samples of the global batch: padding rows weigh 0, so
                # the weights are rescaled by (global batch / real samples in it).
                scaled = tf.nn.compute_average_loss(
                    per_sample,
                    sample_weight=w * (global_batch / global_count(w)),
                    global_batch_size=global_batch,
                )
                if hasattr(optimizer, "scale_loss"):  # fp16: unscaled again by apply_gradients
                    scaled = optimizer.scale_loss(scaled)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return tf.reduce_sum(per_sample * w), tf.reduce_sum(w)

        def val_step(x: Any, y: Any, w: Any) -> Any:
            logits = model(x, training=False)
            per_sample = loss(y, logits)
            keep = tf.reshape(w > 0, (-1, 1, 1))
            truth = tf.where(keep, tf.cast(y, tf.int32), classes)  # padding → ignored label
            # one confusion matrix per candidate threshold (one for multiclass: argmax)
            cms = [
                metrics.confusion_matrix(truth, metrics.logits_to_labels(logits, t), classes)
                for t in thresholds
            ]
            cm = tf.cast(tf.stack(cms), tf.float32)
            return tf.reduce_sum(per_sample * w), tf.reduce_sum(w), cm

        def reduce(values: Any) -> Any:
            return [strategy.reduce(sum_, v, axis=None) for v in values]

        spec = (
            tf.TensorSpec([None, None, None, None], tf.float32),
            tf.TensorSpec([None, None, None], tf.int32),
            tf.TensorSpec([None], tf.float32),
        )
        self.train = tf.function(
            lambda x, y, w: reduce(strategy.run(train_step, (x, y, w))), input_signature=spec
        )
        self.val = tf.function(
            lambda x, y, w: reduce(strategy.run(val_step, (x, y, w))), input_signature=spec
        )


def _batches(shard: Any, batch: int, card: ModelCard) -> Any:
    """Batches of (model input by the card's rule, masks, sample weights, ids, valid maps)."""
    batches = shard.iter_batches(
        batch_size=batch, batch_format="numpy", drop_last=False, prefetch_batches=2
    )
    for b in batches:
        images, masks, valid = (_stacked(b[key]) for key in ("image", "mask", "valid"))
        yield card.normalize_pixels(images, valid), masks, b["weight"], b["id"], valid


def _stacked(column: np.ndarray) -> np.ndarray:
    return np.stack(list(column)) if column.dtype == object else column


def _best_threshold(cms: np.ndarray, thresholds: tuple[float, ...], monitor: str) -> int:
    """The index of the threshold whose confusion matrix scores best on the monitored metric
    (the positive class's IoU when the monitor is a loss); of equals, the one nearest 0.5. A
    class neither present nor predicted (NaN) has nothing wrong: it ranks first."""
    key = monitor if monitor.startswith("val_") and monitor != "val_loss" else "val_iou_1"

    def score(k: int) -> float:
        value = _summary(cms[k]).get(key, float("nan"))
        return float("inf") if np.isnan(value) else value

    return max(sorted(range(len(thresholds)), key=lambda k: abs(thresholds[k] - 0.5)), key=score)


def _summary(cm: np.ndarray) -> dict[str, float]:
    from segray import metrics

    ious, f1s = metrics.iou_per_class(cm), metrics.dice_per_class(cm)
    out = {
        "val_miou": float(metrics.mean_iou(cm)),
        "val_pixel_accuracy": float(metrics.pixel_accuracy(cm)),
    }
    out.update({f"val_iou_{i}": float(v) for i, v in enumerate(ious)})
    out.update({f"val_f1_{i}": float(v) for i, v in enumerate(f1s)})
    return out


def _build(cfg: TrainConfig, card: ModelCard) -> Any:
    from segray import models

    return models.build_model(
        cfg.model,
        cfg.num_classes,
        tuple(card.input_shape),
        encoder=cfg.encoder,
        weights=cfg.weights,
        **card.options,  # the run's options and what the card's rule adds (input_range)
    )


def _start(cfg: TrainConfig, model: Any, optimizer: Any) -> dict[str, Any]:
    """The loop state to start from: Ray Train's checkpoint after a restart, else the newest
    complete checkpoint of this run (``resume``) that loads, else ``resume_from``'s, else a fresh
    state. A checkpoint that does not load is passed over for the next older one, with a warning
    naming both; the state records which one the run went on from."""
    import ray.train

    candidates = []
    restarted = ray.train.get_checkpoint()  # after a restart, or the run's latest on --resume
    if restarted is not None:
        candidates.append((str(restarted.path).rstrip("/").rsplit("/", 1)[-1], restarted))
    for folder in checkpoints.complete_checkpoints(cfg.out, cfg.fs(cfg.out)):
        name = folder.rsplit("/", 1)[-1]
        if name not in (n for n, _ in candidates):
            candidates.append((name, checkpoints.checkpoint_from_uri(folder, cfg.fs(folder))))
    if not candidates and cfg.resume_from:
        candidates.append(
            (
                cfg.resume_from,
                checkpoints.checkpoint_from_uri(cfg.resume_from, cfg.fs(cfg.resume_from)),
            )
        )
    if not candidates:
        return {"epoch": 0, "history": [], "best": None, "bad_epochs": 0}
    state, used, passed = checkpoints.restore_newest(candidates, model, optimizer)
    if passed:
        log.warning(
            "resuming from %s (epoch %d); passed over: %s", used, state["epoch"], "; ".join(passed)
        )
    state["restored"] = [*state.get("restored", []), {"from": used, "passed_over": passed}]
    return state


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one worker's share of the whole run."""
    import keras
    import ray.train
    import tensorflow as tf

    from segray.models import precision as precisions
    from segray.train import losses

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    plan: LoopPlan = loop["plan"]
    cfg, card = plan.config, plan.card
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_worker = cfg.per_worker_batch()
    feed = plan.feed  # this worker's own stream, built anew each epoch
    steps_per_epoch = max(1, -(-plan.train_count // (per_worker * world)))
    keras.utils.set_random_seed(cfg.seed)  # the same initial weights and dropout on every run
    keras.mixed_precision.set_global_policy(precisions.policy(card.precision))
    with strategy.scope():
        model = _build(cfg, card)
        optimizer = make_optimizer(cfg, steps_per_epoch, card.precision)
        optimizer.build(model.trainable_variables)
        state = _start(cfg, model, optimizer)
    # Each start of the loop (fresh, resumed, or restarted after a worker failure) is recorded.
    state["starts"] = [*state.get("starts", []), state["epoch"] + 1]
    loss = losses.build_loss(
        cfg.loss, cfg.num_classes, cfg.class_weights, ignore_index=cfg.ignore_index
    )
    steps = Steps(
        strategy, model, optimizer, loss, cfg.num_classes, per_worker * world, cfg.thresholds()
    )
    board = plan.board if rank == 0 else None
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        _maybe_fail(cfg, epoch, rank)
        where = (board, epoch, steps_per_epoch)
        train_shard, val_shard = feed.train(epoch, rank, world), feed.val(rank, world)
        row, ids = _train_epoch(steps, train_shard, cfg, card, per_worker, rank, where)
        row.update(_validate(steps, val_shard, per_worker, card, cfg) if val_shard else {})
        row["epoch"] = epoch
        state = _advance(state, row, cfg)
        if cfg.diagnostics:
            _write_diagnostics(cfg, epoch, rank, ids, model, per_worker * world)
        ckpt, folder = None, None
        if rank == 0:
            threshold = row.get("val_threshold", card.threshold)
            card = card.replace(metrics=row, epoch=epoch, threshold=threshold)
            folder = checkpoints.save(model, optimizer, card, state)
            ckpt = ray.train.Checkpoint.from_directory(folder)
        name = checkpoints.checkpoint_name(epoch, len(state["starts"]))
        try:
            ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=name)
        finally:
            # the report copied it into the run folder (synchronously): the local one is spent
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        # posted once its checkpoint is in the run folder: a trial Tune stops at this epoch has it
        post_epoch(board, {**row, "placement_group": _placement_group()} if board else row)
        if state["bad_epochs"] and cfg.patience and state["bad_epochs"] >= cfg.patience:
            break  # early stopping: the driver tells from the history


def _train_epoch(
    steps: Steps,
    shard: Any,
    cfg: TrainConfig,
    card: ModelCard,
    per_worker: int,
    rank: int,
    where: tuple[Any, int, int],
) -> tuple[dict[str, float], list[str]]:
    board, epoch, steps_per_epoch = where
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    sums, ids, start = [], [], time.monotonic()
    photometry, post_step = Photometry.of(card), StepPoster(board)
    for step, (images, masks, weights, batch_ids, valid) in enumerate(
        _batches(shard, per_worker, card), 1
    ):
        images, masks = augment_batch(images, masks, cfg.augment, rng, photometry, valid)
        # keep the step's outputs as tensors: converting each one would sync every step
        sums.append(steps.train(images, masks.astype(np.int32), weights.astype(np.float32)))
        ids.extend(str(i) for i, w in zip(batch_ids, weights, strict=True) if w > 0)
        post_step(epoch, step, steps_per_epoch)
    total = sum(float(loss_sum) for loss_sum, _ in sums)
    count = sum(float(n) for _, n in sums)
    seconds = time.monotonic() - start
    return {"loss": total / max(count, 1.0), "img_per_s": count / max(seconds, 1e-9)}, ids


def _validate(
    steps: Steps, shard: Any, per_worker: int, card: ModelCard, cfg: TrainConfig
) -> dict[str, float]:
    """The validation row: loss, and every metric at the threshold that scores the monitored
    metric best (two classes: ``val_threshold``, what the epoch's card keeps)."""
    total, count, cm = 0.0, 0.0, None
    for images, masks, weights, _, _ in _batches(shard, per_worker, card):
        loss_sum, n, batch_cm = steps.val(
            images, masks.astype(np.int32), weights.astype(np.float32)
        )
        total, count = total + float(loss_sum), count + float(n)
        cm = np.asarray(batch_cm) if cm is None else cm + np.asarray(batch_cm)
    out = {"val_loss": total / max(count, 1.0)}
    if cm is not None:
        thresholds = cfg.thresholds()
        k = _best_threshold(cm.astype(np.int64), thresholds, cfg.monitor or "")
        out.update(_summary(cm[k].astype(np.int64)))
        if cfg.num_classes == 2:
            out["val_threshold"] = thresholds[k]
    return out


def _advance(state: dict[str, Any], row: dict[str, float], cfg: TrainConfig) -> dict[str, Any]:
    """Record an epoch and update the early-stopping bookkeeping (identical on every worker)."""
    value, best = row.get(cfg.monitor, float("nan")), state["best"]
    if np.isnan(value):  # e.g. a class neither present nor predicted: never better than a number
        better = best is None
    elif best is None or np.isnan(best):
        better = True
    else:
        better = value > best if monitor_mode(cfg.monitor) == "max" else value < best
    return {
        **state,
        "epoch": row["epoch"],
        "history": [*state["history"], row],
        "best": value if better else state["best"],
        "bad_epochs": 0 if better else state["bad_epochs"] + 1,
    }


def _placement_group() -> str | None:
    """The id of the placement group this worker runs in (Ray Train's), for ``segray tune`` to
    release when Tune stops the trial before Ray Train could."""
    import ray.util

    group = ray.util.get_current_placement_group()
    return group.id.hex() if group is not None else None


def _maybe_fail(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Test-only fault injection: the last worker dies once, at the start of ``fail_at_epoch``."""
    if cfg.fail_at_epoch != epoch or rank != cfg.workers - 1:
        return
    marker = storage.join(cfg.out, "_fault_injected")
    out = cfg.fs(marker)
    if out.exists(marker):
        return
    out.write_text(marker, f"worker {rank} killed at epoch {epoch}\n")
    os._exit(1)


def _write_diagnostics(
    cfg: TrainConfig, epoch: int, rank: int, ids: list[str], model: Any, global_batch: int
) -> None:
    doc = {
        "rank": rank,
        "epoch": epoch,
        "ids": ids,
        "weights_sha256": checkpoints.weights_checksum(model),
        "global_batch": global_batch,
    }
    uri = storage.join(cfg.out, "diagnostics", f"epoch{epoch:04d}_rank{rank}.json")
    cfg.fs(uri).write_text(uri, json.dumps(doc))
