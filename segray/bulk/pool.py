"""Predictor actors: a job's own, or a named pool on a running cluster that loads a model once.

A :class:`~segray.bulk.predictor.Predictor` actor loads a model once and predicts batches of
tiles or scene windows for whichever job sends them, with that job's settings. A scene job starts
its own; ``segray pool start NAME --model URI`` starts a pool of detached ones (named
``segray-pool:NAME:i`` in Ray namespace ``segray``) that outlive the command, and every ``segray
predict --pool NAME`` sends its blocks there instead of starting Predictors: each actor reads,
predicts and writes a block of tiles (in threads of its own, one model call at a time), so the
job imports no Keras, loads no model and starts no worker process, and its first masks come as
soon as it has joined Ray and listed its inputs. A pool holds one model version in one precision;
a job whose card has another version, or that asks for another precision, is refused with both
named. Its actors restart where they die (``max_restarts=-1``: a lost node), and Monte-Carlo
dropout is switched on a job's first batch that asks for it, off on the next that does not (each
switch recompiles the model's call: jobs that differ there are best given pools of their own).
``segray pool list`` shows what each pool holds, ``segray pool stop NAME`` ends one.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.bulk.predictor import Predictor
from segray.bulk.rows import STOP, objects
from segray.bulk.scheduler import bounded
from segray.bulk.sinks import file_columns
from segray.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from segray.bulk.config import PoolConfig, PredictConfig
    from segray.bulk.sinks import Sink
    from segray.models.saving import ModelCard

#: The Ray namespace of every pool's actors, so that any job's driver finds them by name.
NAMESPACE = "segray"
PREFIX = "segray-pool"
#: Blocks a pool actor works on at once (its ``io`` concurrency group): reads and writes of some
#: while the model runs on another.
IO_THREADS = 4


def actor_name(pool: str, index: int) -> str:
    return f"{PREFIX}:{pool}:{index}"


@dataclass(frozen=True)
class PoolInfo:
    """What a pool holds, as its first actor reports it."""

    name: str
    size: int
    model: str
    version: str
    precision: str
    batches: int
    started: float
    runtime: str = "keras"

    def summary(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"{self.name}: {self.size} actor(s) of {self.model} (version {self.version}, "
            f"{self.precision}, {self.runtime}), up since {since}, {self.batches} batch(es) "
            "predicted by actor 0"
        )

    def holds(self, version: str, precision: str, runtime: str) -> bool:
        """True when the pool holds this model version in this precision and runtime."""
        return (self.version, self.precision, self.runtime) == (version, precision, runtime)


def own_actors(config: PredictConfig, card: ModelCard) -> list:
    """``config.concurrency`` Predictor actors of one job, their models loaded (a model that
    cannot load fails the job here)."""
    import ray

    actor = ray.remote(Predictor).options(
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
        max_restarts=2,
        max_task_retries=2,
    )
    actors = [actor.remote(config, card) for _ in range(config.concurrency)]
    ray.get([one.ready.remote() for one in actors])
    return actors


# --- named pools ---------------------------------------------------------------------------------


def _pool_actors(name: str) -> list:
    """The live actors of pool ``name``, in index order (empty: no such pool)."""
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        pool, _, index = entry["name"].removeprefix(f"{PREFIX}:").rpartition(":")
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(PREFIX) and pool == name:
            found.append((int(index), entry["name"]))
    handles = []
    for _, actor in sorted(found):
        try:
            handles.append(ray.get_actor(actor, namespace=NAMESPACE))
        except ValueError:  # ended since it was listed
            continue
    return handles


def describe(actor: Any) -> dict[str, Any]:
    """What a pool's actor reports: model, version, precision, batches, started, pid."""
    import ray

    return ray.get(actor.describe.options(concurrency_group="control").remote())


def _info(name: str, actors: list) -> PoolInfo:

    info = describe(actors[0])
    keys = ("model", "version", "precision", "batches", "started", "runtime")
    return PoolInfo(name=name, size=len(actors), **{k: info[k] for k in keys if k in info})


def start_pool(name: str, settings: PoolConfig) -> PoolInfo:
    """Start pool ``name`` of ``settings.size`` detached actors and wait until each has loaded
    the model; a pool of that name holding the same model version and precision is kept."""
    import ray

    from segray.models import saving

    card = saving.vet(settings.model, settings.fs(settings.model))  # before any actor starts
    precision = settings.precision or card.precision
    running = _pool_actors(name)
    if running:
        info = _info(name, running)
        if info.holds(card.version, precision, settings.runtime):
            return info
        raise ConfigError(
            f"pool {name!r} holds {info.model} (version {info.version}, {info.precision}, "
            f"{info.runtime}), not {settings.model} (version {card.version}, {precision}, "
            f"{settings.runtime}): stop it first "
            f"(segray pool stop {name}) or name another pool"
        )
    # "control": answers what the pool holds while the other groups are busy predicting
    groups = {"io": IO_THREADS, "control": 1}
    actor = ray.remote(concurrency_groups=groups)(Predictor)
    options = {
        "lifetime": "detached",
        "namespace": NAMESPACE,
        "num_cpus": settings.cpus_per_actor,
        "num_gpus": settings.gpus_per_actor or None,
        "max_restarts": -1,
        "max_task_retries": 2,
        "scheduling_strategy": "SPREAD",
    }
    actors = [
        actor.options(name=actor_name(name, i), **options).remote(settings, card, name)
        for i in range(settings.size)
    ]
    try:
        ray.get([one.ready.remote() for one in actors])
    except Exception as exc:
        for one in actors:
            ray.kill(one, no_restart=True)
        raise ModelError(f"pool {name!r}: {settings.model} could not be loaded: {exc}") from exc
    return _info(name, actors)


def list_pools() -> list[PoolInfo]:
    """Every pool on the cluster."""
    import ray

    names = set()
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(f"{PREFIX}:"):
            names.add(entry["name"].removeprefix(f"{PREFIX}:").rpartition(":")[0])
    pools = [(name, _pool_actors(name)) for name in sorted(names)]
    return [_info(name, actors) for name, actors in pools if actors]


def stop_pool(name: str) -> int:
    """End pool ``name``'s actors; returns how many there were (0: no such pool)."""
    import ray

    actors = _pool_actors(name)
    for one in actors:
        ray.kill(one, no_restart=True)
    return len(actors)


def attach(config: PredictConfig, card: ModelCard) -> list:
    """The actors of pool ``config.pool``, checked to hold the job's model version in the job's
    precision."""
    actors = _pool_actors(str(config.pool))
    if not actors:
        raise ConfigError(
            f"no pool {config.pool!r} on this Ray cluster: start it with "
            f"`segray pool start {config.pool} --model {config.model}` (see `segray pool list`)"
        )
    info = _info(str(config.pool), actors)
    precision = config.precision or card.precision
    if not info.holds(card.version, precision, config.runtime):
        raise ConfigError(
            f"pool {config.pool!r} holds {info.model} (version {info.version}, "
            f"{info.precision}, {info.runtime}); this job asks for {config.model} (version "
            f"{card.version}, {precision}, {config.runtime}): start a pool for it, or run "
            "without --pool"
        )
    return actors


def run_tiles(
    items: list[dict[str, str]],
    config: PredictConfig,
    sinks: Sequence[Sink],
    actors: list,
    num_classes: int,
) -> Generator[dict[str, np.ndarray], None, None]:
    """The manifest rows of a pooled tile job, a block at a time: blocks of ``tiles_per_task``
    tiles go to the pool's actors in turn (:meth:`Predictor.process`), at most
    :data:`IO_THREADS` in flight on each; a block whose actor call fails becomes error rows (a
    rerun predicts them). No Ray Data here: its tasks would need worker processes of this job,
    seconds to start, where the pool's actors are up already. Closing the generator cancels the
    calls still running."""

    size = config.tiles_per_task
    blocks = [items[i : i + size] for i in range(0, len(items), size)]

    def submit(turn: int, block: list[dict[str, str]]) -> Any:
        call = actors[turn % len(actors)].process.options(concurrency_group="io")
        return call.remote(config, sinks, _columns(block))

    def failed(block: list[dict[str, str]], exc: Exception) -> dict[str, np.ndarray]:
        return _failed(block, f"pool {config.pool!r}: {exc}", num_classes)

    yield from bounded(blocks, submit, IO_THREADS * len(actors), failed)


def _columns(block: list[dict[str, str]]) -> dict[str, np.ndarray]:
    return {k: objects([row[k] for row in block]) for k in block[0]}


def _failed(block: list[dict[str, str]], reason: str, num_classes: int) -> dict[str, np.ndarray]:
    n = len(block)
    empty = (*file_columns(), STOP)
    return {
        "input_uri": objects([row["input_uri"] for row in block]),
        "status": objects(["error"] * n),
        "error": objects([f"{row['input_uri']}: {reason}" for row in block]),
        **{k: objects([""] * n) for k in empty},
        "class_fractions": np.full((n, num_classes), np.nan),
        "seconds": np.zeros(n),
    }
