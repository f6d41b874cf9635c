"""``segray bench train``: the cost of Ray Train, measured side by side in one run.

Four trainings of the same model on the same tiles with the same global batch: bare single-process
Keras (``model.fit``, no Ray), the Ray Train loop on 1 worker decoding the tiles every epoch
(``cache_mib=0``), on 1 worker with its tile cache (the default), and on 2 workers. Throughput is
images per second over the epochs after the first (which pays for tracing and start-up). The
figures that matter are the ratios: Ray 1 worker / bare Keras (overhead), Ray 2 / Ray 1 (scaling).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np


def _bare_keras(data: str, size: int, options: dict, batch: int, epochs: int) -> float:
    """img/s of plain ``model.fit`` on the same tiles, normalised as training normalises them."""
    import keras

    from segray import models
    from segray.datasets import labels
    from segray.io import bands
    from segray.train import losses

    spec = labels.DatasetSpec(root=data, size=size, val_fraction=0.2)
    train_s, _ = labels.split_samples(labels.find_samples(spec), 0.2, 0)
    rows = [labels.load_sample(s, spec) for s in train_s]
    x = bands.normalize(np.stack([r["image"] for r in rows]))  # uint8 tiles: today's rule
    y = np.stack([r["mask"] for r in rows]).astype(np.int32)[..., None]  # keras keeps (B,H,W,1)
    model = models.build_model("unet", 2, (size, size, 3), **options)
    loss = losses.build_loss("ce+dice", 2)

    def ce_dice(y: Any, logits: Any) -> Any:  # keras wants a scope-safe name, not "ce+dice"
        return loss(y, logits)

    model.compile(keras.optimizers.Adam(1e-3), loss=ce_dice)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            times.append(time.perf_counter() - self.start)

    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[Timer()])
    return len(x) * (epochs - 1) / sum(times[1:])


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
    rates = [h["img_per_s"] for h in result.history[1:]]
    return float(np.mean(rates))


def bench_train(
    tiles: int = 160,
    size: int = 64,
    batch: int = 16,
    epochs: int = 4,
    base_filters: int = 16,
    echo: Any = print,
) -> dict[str, float]:
    """Run the three trainings and print img/s and the ratios; returns the figures."""
    from segray.devtools import synth
    from segray.runtime import init_ray

    options = {"base_filters": base_filters}
    init_ray(log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        synth.write_collection(data, count=tiles, size=size, mode="binary")
        echo(
            f"bench train: unet base_filters={base_filters}, {tiles} tiles of {size}px, "
            f"global batch {batch}, {epochs} epochs (first excluded)"
        )
        bare = _bare_keras(data, size, options, batch, epochs)
        echo(f"  bare Keras model.fit      {bare:8.1f} img/s")
        streamed = _ray(data, f"{tmp}/r0", size, options, batch, epochs, 1, cache_mib=0)
        echo(f"  Ray Train, 1 worker, tiles decoded every epoch {streamed:8.1f} img/s")
        one = _ray(data, f"{tmp}/r1", size, options, batch, epochs, 1)
        echo(f"  Ray Train, 1 worker       {one:8.1f} img/s")
        two = _ray(data, f"{tmp}/r2", size, options, batch, epochs, 2)
        echo(f"  Ray Train, 2 workers      {two:8.1f} img/s")
    figures = {
        "bare_img_s": bare,
        "ray1_streamed_img_s": streamed,
        "ray1_img_s": one,
        "ray2_img_s": two,
        "ray1_over_bare": one / bare,
        "overhead": 1.0 - one / bare,
        "ray2_over_ray1": two / one,
    }
    echo(
        f"  ratio Ray 1 worker decoding every epoch / bare Keras = {streamed / bare:.2f}\n"
        f"  ratio Ray 1 worker / bare Keras = {figures['ray1_over_bare']:.2f} "
        f"(overhead {figures['overhead']:.0%}, goal ≤ 10%)\n"
        f"  ratio Ray 2 workers / 1 worker  = {figures['ray2_over_ray1']:.2f}"
    )
    return figures
