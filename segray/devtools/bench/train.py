"""``segray bench train``: the cost of Ray Train, measured side by side in one run.

Five trainings of the same model on the same tiles with the same global batch: bare single-process
Keras (``model.fit``, no Ray), segray's compiled step alone on the same tiles in memory (no Ray:
the loop's ceiling), the Ray Train loop on 1 worker decoding the tiles every epoch
(``cache_mib=0``), on 1 worker with its tile cache (the default), and on 2 workers. Throughput is
the median of the images per second of the epochs after the first (which pays for tracing and
start-up). The figures that matter are the ratios: Ray 1 worker / bare Keras (the issue's goal),
Ray 1 worker / the step alone (what Ray Train itself costs), Ray 2 / Ray 1 (scaling). ``rounds``
repeats the trainings in turn, so that a noisy minute of the machine falls on one round, not on
one side; the ratios are the medians of the rounds' ratios.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from segray.devtools.bench.harness import epoch_timer


def _tiles(data: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The training tiles in memory, normalised as training normalises them, and their masks."""
    from segray.datasets import labels
    from segray.io import bands

    spec = labels.DatasetSpec(root=data, size=size, val_fraction=0.2)
    train_s, _ = labels.split_samples(labels.find_samples(spec), 0.2, 0)
    rows = [labels.load_sample(s, spec) for s in train_s]
    x = bands.normalize(np.stack([r["image"] for r in rows]))  # uint8 tiles: today's rule
    return x, np.stack([r["mask"] for r in rows]).astype(np.int32)


def _bare_keras(data: str, size: int, options: dict, batch: int, epochs: int) -> float:
    """img/s of plain ``model.fit`` on the same tiles, normalised as training normalises them."""
    import keras

    from segray import models
    from segray.train import losses

    x, masks = _tiles(data, size)
    y = masks[..., None]  # keras keeps (B, H, W, 1)
    model = models.build_model("unet", 2, (size, size, 3), **options)
    loss = losses.build_loss("ce+dice", 2)

    def ce_dice(y: Any, logits: Any) -> Any:  # keras wants a scope-safe name, not "ce+dice"
        return loss(y, logits)

    model.compile(keras.optimizers.Adam(1e-3), loss=ce_dice)
    times: list[float] = []
    timer = epoch_timer(times)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[timer])
    return float(np.median([len(x) / t for t in times[1:]]))


def _step(data: str, size: int, options: dict, batch: int, epochs: int) -> float:
    """img/s of segray's own compiled step (:class:`segray.train.loop.Steps`, Ray Train's loop
    without Ray: the default strategy, in this process) on the same tiles in memory, batches in
    a new order each epoch: the ceiling of the Ray Train loop on this machine."""
    import keras
    import tensorflow as tf

    from segray import models
    from segray.train import losses
    from segray.train.loop import Steps

    x, y = _tiles(data, size)
    strategy = tf.distribute.get_strategy()
    model = models.build_model("unet", 2, (size, size, 3), **options)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    steps = Steps(strategy, model, optimizer, losses.build_loss("ce+dice", 2), 2, batch)
    rng, rates = np.random.default_rng(0), []
    for _ in range(epochs):
        order, start, sums = rng.permutation(len(x)), time.perf_counter(), []
        for i in range(0, len(x), batch):
            pick = order[i : i + batch]
            sums.append(steps.train(x[pick], y[pick], np.ones(len(pick), np.float32)))
        float(sum(float(n) for _, n in sums))  # the epoch's last step has run
        rates.append(len(x) / (time.perf_counter() - start))
    return float(np.median(rates[1:]))


def _ray(
    data: str,
    out: str,
    size: int,
    options: dict,
    batch: int,
    epochs: int,
    workers: int,
    cache_mib: int = 1024,
) -> float:
    from segray.train.augment import AugmentConfig
    from segray.train.config import TrainConfig
    from segray.train.driver import train

    result = train(
        TrainConfig(
            data=data,
            out=out,
            model_options=options,
            num_classes=2,
            size=size,
            epochs=epochs,
            batch_size=batch,
            workers=workers,
            max_failures=0,
            cache_mib=cache_mib,
            augment=AugmentConfig.off(),
            # each configuration gets the whole machine, as bare Keras does: Ray pins a worker's
            # OpenMP/oneDNN threads to its CPU count
            cpus_per_worker=max(1.0, (os.cpu_count() or 1) / workers),
        )
    )
    return float(np.median([h["img_per_s"] for h in result.history[1:]]))


#: The trainings of a round, in the order they run: (key, label, workers, cache_mib).
SIDES = (
    ("bare", "bare Keras model.fit", 0, 0),
    ("step", "segray's step alone, no Ray", -1, 0),
    ("ray1_streamed", "Ray Train, 1 worker, tiles decoded every epoch", 1, 0),
    ("ray1", "Ray Train, 1 worker (tile cache)", 1, 1024),
    ("ray2", "Ray Train, 2 workers", 2, 1024),
)


def bench_train(
    tiles: int = 160,
    size: int = 64,
    batch: int = 16,
    epochs: int = 4,
    base_filters: int = 16,
    rounds: int = 1,
    sides: tuple[str, ...] | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Run the trainings (``sides``, keys of :data:`SIDES`; default all of them) ``rounds`` times in
    turn and print img/s and the ratios (medians of the rounds'); returns the figures, each
    side's rates of every round under ``rounds``."""
    from segray.devtools import synth
    from segray.runtime import init_ray

    if epochs < 2 or rounds < 1:
        raise ValueError(f"bench train needs epochs >= 2 and rounds >= 1; got {epochs}, {rounds}")
    keys = [key for key, *_ in SIDES]
    unknown = sorted(set(sides or ()) - set(keys))
    if unknown:
        raise ValueError(f"unknown bench train side(s) {unknown}; choose from {keys}")
    chosen = [side for side in SIDES if sides is None or side[0] in sides]
    options = {"base_filters": base_filters}
    init_ray(log_to_driver=False)
    rates: dict[str, list[float]] = {key: [] for key, *_ in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        synth.write_collection(data, count=tiles, size=size, mode="binary")
        echo(
            f"bench train: unet base_filters={base_filters}, {tiles} tiles of {size}px, "
            f"global batch {batch}, {epochs} epochs (the first excluded; median of the others), "
            f"{rounds} round(s)"
        )
        for r in range(rounds):
            for key, label, workers, cache in chosen:
                if workers == 0:
                    rate = _bare_keras(data, size, options, batch, epochs)
                elif workers < 0:
                    rate = _step(data, size, options, batch, epochs)
                else:
                    out = f"{tmp}/{key}-{r}"
                    rate = _ray(data, out, size, options, batch, epochs, workers, cache)
                rates[key].append(rate)
                echo(f"  round {r + 1}: {label:<48} {rate:8.1f} img/s")
    return _summary(rates, echo)


def _summary(rates: dict[str, list[float]], echo: Any) -> dict[str, Any]:
    """The medians of each side's rates and of the rounds' ratios (of the sides that ran),
    printed."""
    figures: dict[str, Any] = {f"{key}_img_s": float(np.median(v)) for key, v in rates.items()}
    figures["rounds"] = {key: [round(v, 1) for v in values] for key, values in rates.items()}
    for a, b, label in RATIOS:
        if a in rates and b in rates:
            each = np.asarray(rates[a]) / np.asarray(rates[b])
            figures[f"{a}_over_{b}"] = float(np.median(each))
            rounds = ", ".join(f"{v:.2f}" for v in each)
            echo(f"  ratio {label} = {figures[f'{a}_over_{b}']:.2f} (rounds: {rounds})")
    if "ray1_over_bare" in figures:
        figures["overhead"] = 1.0 - figures["ray1_over_bare"]
        echo(f"  overhead of Ray Train on 1 worker: {figures['overhead']:.0%} (goal ≤ 10%)")
    return figures


#: The ratios printed: (side, anchor, label).
RATIOS = (
    ("ray1_streamed", "bare", "Ray 1 worker decoding every epoch / bare Keras"),
    ("ray1", "bare", "Ray 1 worker / bare Keras"),
    ("step", "bare", "segray's step alone / bare Keras"),
    ("ray1", "step", "Ray 1 worker / segray's step alone"),
    ("ray2", "ray1", "Ray 2 workers / 1 worker"),
)
