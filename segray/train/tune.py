"""``segray tune``: a training recipe searched per dataset with Ray Tune.

Each trial is an ordinary segray training run (:func:`segray.train.driver.train`) of the base
settings with the trial's values over them, in ``<out>/trials/<trial>/``; every epoch it reports
its metrics to Tune, whose ASHA scheduler stops the trials that lag on the monitored metric. As
many trials run at once as the cluster's CPUs allow. A search whose driver was lost resumes with
``--resume`` (Tune's restore); its trials go on from their own last checkpoints. The best trial's
model, card and settings are copied into ``<out>/best``, a run folder that predict, serve and
eval take as it is, and ``<out>/trials.csv`` lists every trial.

The search space maps a training setting to a distribution, in YAML or as ``--space`` flags::

    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    loss: {choice: [ce+dice, focal+dice]}
    class_balance: {uniform: [0.0, 1.0]}
    batch_size: {choice: [8, 16]}
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from segray.errors import ConfigError
from segray.io import storage
from segray.settings import Settings, setting
from segray.train.config import TrainConfig, monitor_mode
from segray.train.space import load_space, parse_space

log = logging.getLogger("segray.train")
#: The run folder's files that make the best trial's folder.
BEST_FILES = ("model.keras", "model.json", "config.yaml", "metrics.csv", "curves.png")


class TuneConfig(Settings):
    """How the search runs; what each trial trains is a :class:`TrainConfig` beside it."""

    trials: int = setting(16, "Trials (samples of the space; each grid value this many).", ge=1)
    scheduler: Literal["asha", "none"] = setting(
        "asha", "asha: stop trials that lag on the monitored metric; none: run each to the end."
    )
    grace_epochs: int = setting(4, "Epochs every trial runs before ASHA may stop it.", ge=1)
    reduction_factor: float = setting(3.0, "ASHA keeps 1 in this many at each rung.", gt=1)
    max_concurrent: int | None = setting(
        None, "Trials at once (default: as many as the cluster's CPUs allow).", ge=1
    )
    space_file: str | None = setting(
        None, "YAML file of the search space (setting: {distribution: arguments})."
    )
    resume: bool = setting(False, "Resume the search in --out after its driver was lost.")


@dataclass
class TuneResult:
    """A finished search: its trials (settings, best metric, epochs, seconds) and the best."""

    out: str
    metric: str
    mode: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    #: With --tracking-uri: the registered version of the best trial's model (name/version).
    mlflow_model: str | None = None

    def table(self) -> str:
        """The trials as text, best first."""
        keys = sorted({k for row in self.rows for k in row["settings"]})
        head = ["trial", *keys, self.metric, "best epoch", "epochs", "seconds", "state"]
        lines = ["  ".join(head)]
        for row in self.rows:
            values = [row["trial"], *(_text(row["settings"].get(k)) for k in keys)]
            values += [f"{row['best']:.4f}", str(row["best_epoch"]), str(row["epochs"])]
            values += [f"{row['seconds']:.0f}", row["state"]]
            lines.append("  ".join(values))
        return "\n".join(lines)


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_config(base: TrainConfig, values: Mapping[str, Any], out: str) -> TrainConfig:
    """The training settings of one trial: the base with the trial's values, in ``out``. A trial
    tracks nothing itself: Ray Tune's MLflow logger makes each trial a run, and the search
    registers only the best model."""
    from segray.train import checkpoints

    fields = {**base.to_dict(), **dict(values), "out": out, "resume_from": None}
    fields["tracking_uri"] = None
    # A worker lost fails the trial, which Tune restarts from its checkpoint (--max-failures):
    # a Ray Train controller that restarted its workers itself could do so just as Tune stops
    # the trial, and leave the new workers' placement group behind.
    fields["max_failures"] = 0
    fields["resume"] = checkpoints.has_checkpoints(out, base.fs(out))  # a restored trial
    return TrainConfig(**fields)


def _trial(values: dict[str, Any], base: dict[str, Any], root: str, local: bool = False) -> None:
    """One Tune trial: a segray training run that reports each epoch's metrics to Tune; ``local``
    when the search runs on a Ray that ``segray tune`` started (Ray Train's local settings)."""
    import ray.tune

    from segray.train.driver import train

    name = ray.tune.get_context().get_trial_id()
    config = trial_config(TrainConfig(**base), values, storage.join(root, "trials", name))
    reported: set[int] = set()

    def report(rows: list[dict[str, Any]], last: bool = False) -> None:
        for row in rows:
            epoch = int(row["epoch"])
            # The last epoch is reported once the run folder is written: Tune ends a trial at
            # its last report, and this one must not end before its model is saved.
            if epoch not in reported and (last or epoch < config.epochs):
                reported.add(epoch)
                ray.tune.report({**row, "trial_out": config.out})

    result = train(config, on_epochs=report, local_ray=local)
    report(result.history, last=True)  # and those the progress board had not shown yet


def concurrency(base: TrainConfig, cluster_cpus: float) -> int:
    """Trials at once: each takes its workers' CPUs and one more for reading the data."""
    per_trial = base.workers * base.cpus_per_worker + 1
    return max(1, int(cluster_cpus // per_trial))


def tune(base: TrainConfig, tune_config: TuneConfig, space_flags: Sequence[str] = ()) -> TuneResult:
    """Search ``base``'s settings over the space; write ``<out>/best`` and ``trials.csv``."""
    import ray
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from segray.runtime import init_ray, started_here

    root = base.out
    if storage.parse(root).scheme != "file":
        raise ConfigError(f"--out {root}: segray tune keeps its search in a local folder")
    root = os.path.abspath(root)
    space = parse_space(load_space(tune_config.space_file, space_flags))
    metric = base.monitor or "val_miou"
    mode = monitor_mode(metric)
    init_ray()
    scheduler = (
        ASHAScheduler(
            max_t=base.epochs,
            grace_period=min(tune_config.grace_epochs, base.epochs),
            reduction_factor=tune_config.reduction_factor,
        )
        if tune_config.scheduler == "asha"
        else FIFOScheduler()
    )
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, base=base.to_dict(), root=root, local=started_here()),
        {"CPU": 0.01},
    )
    at_once = tune_config.max_concurrent or concurrency(base, ray.cluster_resources()["CPU"])
    search = os.path.join(root, "tune")
    start = time.monotonic()
    if tune_config.resume:
        if not ray_tune.Tuner.can_restore(search):
            raise ConfigError(f"--resume: no search to resume under {search}")
        tuner = ray_tune.Tuner.restore(
            search, trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        if os.path.exists(search):
            raise ConfigError(f"{root} already holds a search: pass --resume, or a new --out")
        tuner = ray_tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray_tune.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=scheduler,
                # --seed fixes the draws too: the same search twice samples the same trials (a
                # search algorithm given here ignores max_concurrent_trials: it limits itself)
                search_alg=BasicVariantGenerator(random_state=base.seed, max_concurrent=at_once),
                num_samples=tune_config.trials,
                max_concurrent_trials=at_once,
            ),
            run_config=ray_tune.RunConfig(
                name="tune",
                storage_path=root,
                callbacks=_callbacks(base),
                failure_config=ray_tune.FailureConfig(max_failures=base.max_failures),
            ),
        )
    log.info("searching %d trial(s), %d at once, on %s", tune_config.trials, at_once, metric)
    grid = tuner.fit()
    result = _result(root, grid, metric, mode, list(space), base.epochs)
    _write(result, base)
    result.mlflow_model = _track_best(base, result)
    log.info("search done in %.0f s", time.monotonic() - start)
    return result


def _track_best(base: TrainConfig, result: TuneResult) -> str | None:
    """With ``--tracking-uri``: the best trial's run folder logged as one more MLflow run (its
    settings, per-epoch metrics, files and model) and its model registered; returns the version."""
    from segray.train import tracking
    from segray.train.driver import load_config

    tracker = tracking.tracker_for(base.tracking_uri, base.experiment, base.registered_model)
    if tracker is None or tracker.failed or result.best is None:
        return None
    best = storage.join(result.out, "best")
    fs = base.fs(best)
    tags = {"segray.out": best, "segray.search": result.out, "segray.trial": result.best["trial"]}
    tracker.start(f"{os.path.basename(result.out)}-best", load_config(best, fs), tags)
    history = list(csv.DictReader(io.StringIO(fs.read_text(storage.join(best, "metrics.csv")))))
    tracker.epochs([{k: float(v) for k, v in row.items() if v != ""} for row in history])
    summary = {"best_epoch": result.best["best_epoch"], "monitor": result.metric}
    return tracker.finish(best, fs, summary)


def _callbacks(base: TrainConfig) -> list[Any]:
    """The release of stopped trials' workers, and Ray Tune's MLflow logger (each trial a run)
    when a tracking server answers."""
    from segray.train import tracking

    callbacks = [_release_callback()]
    tracker = tracking.tracker_for(base.tracking_uri, base.experiment, base.registered_model)
    if tracker is None or tracker.failed:
        return callbacks
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    logger = MLflowLoggerCallback(tracking_uri=base.tracking_uri, experiment_name=base.experiment)
    return [*callbacks, logger]


def _release_callback() -> Any:
    """A Tune callback that removes the placement group of a trial's Ray Train workers when the
    trial ends. Tune ends a trial that ASHA stops by killing its actor, and Ray Train's controller,
    killed with it, cannot remove its workers' placement group: each stopped trial would keep
    its workers' CPUs until the search ends, and later trials would wait for them forever."""
    from ray.tune import Callback

    class ReleaseTrainWorkers(Callback):
        def __init__(self) -> None:
            self.groups: dict[str, str] = {}

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if result.get("placement_group"):
                self.groups[trial.trial_id] = result["placement_group"]

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release(self.groups.pop(trial.trial_id, None))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release(self.groups.pop(trial.trial_id, None))

    return ReleaseTrainWorkers()


def release(group: str | None) -> bool:
    """Remove the placement group ``group`` (hex id) if it still exists; True if it did."""
    if not group:
        return False
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    found = PlacementGroup(PlacementGroupID.from_hex(group))
    if placement_group_table(found).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(found)
    log.debug("released placement group %s of a stopped trial", group)
    return True


def _result(
    root: str, grid: Any, metric: str, mode: str, keys: list[str], epochs: int
) -> TuneResult:
    sign = 1.0 if mode == "max" else -1.0
    rows = []
    for trial in grid:
        history = trial.metrics_dataframe
        if history is None or history.empty or metric not in history:
            continue
        values = history[metric].astype(float)
        valid = values[~values.isna()]
        if valid.empty:
            continue
        index = (valid * sign).idxmax()
        ran = int(history["epoch"].max())
        state = "error" if trial.error else ("stopped" if ran < epochs else "done")
        rows.append(
            {
                "trial": os.path.basename(str(trial.metrics.get("trial_out", ""))) or "?",
                "settings": {k: trial.config.get(k) for k in keys},
                "best": float(valid[index]),
                "best_epoch": int(history.loc[index, "epoch"]),
                "epochs": ran,
                "seconds": float(trial.metrics.get("time_total_s", math.nan)),
                "state": state,
                "out": trial.metrics.get("trial_out"),
            }
        )
    rows.sort(key=lambda r: -sign * r["best"])
    return TuneResult(out=root, metric=metric, mode=mode, rows=rows, best=rows[0] if rows else None)


def _write(result: TuneResult, base: TrainConfig) -> None:
    """``trials.csv`` and the best trial's run folder as ``<out>/best``."""
    fs = base.fs(result.out)
    buf = io.StringIO()
    keys = sorted({k for row in result.rows for k in row["settings"]})
    writer = csv.writer(buf)
    writer.writerow(["trial", *keys, result.metric, "best_epoch", "epochs", "seconds", "state"])
    for row in result.rows:
        writer.writerow(
            [row["trial"], *(row["settings"].get(k) for k in keys)]
            + [row["best"], row["best_epoch"], row["epochs"], round(row["seconds"], 1)]
            + [row["state"]]
        )
    fs.write_text(storage.join(result.out, "trials.csv"), buf.getvalue())
    if result.best is None:
        raise ConfigError(f"no trial reported {result.metric}: see {result.out}/tune")
    best = storage.join(result.out, "best")
    source = result.best["out"]
    if not fs.exists(storage.join(source, "model.keras")):  # stopped by ASHA: no run folder yet
        from segray.train import checkpoints
        from segray.train.history import history_csv, plot_curves

        source = _best_checkpoint(source, result.best["best_epoch"], fs)
        history = checkpoints.read_state(checkpoints.checkpoint_from_uri(source, fs))["history"]
        fs.write_text(storage.join(best, "metrics.csv"), history_csv(history))
        fs.write_bytes(storage.join(best, "curves.png"), plot_curves(history, result.metric))
    for name in BEST_FILES:
        found = storage.join(source, name)
        if not fs.exists(found):
            found = storage.join(result.best["out"], name)  # config.yaml of a stopped trial
        if fs.exists(found):
            fs.write_bytes(storage.join(best, name), fs.read_bytes(found))
    from segray.inference import export

    export.write_run_item(best, fs)  # its STAC MLM item, as every run folder has


def _best_checkpoint(trial: str, epoch: int, fs: Any) -> str:
    """The checkpoint folder of a stopped trial's best epoch (Ray Train keeps its best two),
    else its newest."""
    from segray.train import checkpoints

    folders = checkpoints.complete_checkpoints(trial, fs)
    if not folders:
        raise ConfigError(f"{trial}: the best trial left no checkpoint")
    for folder in folders:
        if checkpoints.read_state(checkpoints.checkpoint_from_uri(folder, fs))["epoch"] == epoch:
            return folder
    return folders[0]
