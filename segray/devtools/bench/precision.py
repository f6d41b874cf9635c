"""``segray bench precision``: fp32 against bf16 (and fp16) in one run, with XLA off and on.

- **predict**: the same windows through ``inference.infer`` (the call bulk, Serve and eval make),
  the model rebuilt in each precision by :func:`segray.models.precision.with_precision` with the
  same weights; rounds interleaved, the median of ``repeats`` rounds, windows/s and the ratio to
  fp32 with XLA off.
- **train**: bare Keras ``fit`` of the same model on the same batches under each policy (the
  arithmetic alone, no Ray), images/s over the epochs after the first.
- **accuracy**: with ``--model`` and ``--data`` (labelled tiles), the mean IoU of the model on
  them in each precision, and the share of pixels whose class differs from fp32's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from segray.devtools.bench.harness import epoch_timer


def _windows(card: Any, count: int, seed: int = 0) -> np.ndarray:
    h, w, c = card.input_shape
    return np.random.default_rng(seed).random((count, h, w, c), np.float32)


def _variants(model: Any, precisions: list[str], xla: bool) -> dict[tuple[str, bool], Any]:
    """A model of its own (same weights) per precision and XLA setting."""
    import keras

    from segray.models.precision import with_precision

    out = {}
    for precision in precisions:
        for jit in (False, True) if xla else (False,):
            variant = with_precision(model, precision)
            if variant is model:
                variant = keras.models.clone_model(model)
                variant.set_weights(model.get_weights())
            variant.compile(jit_compile=jit)
            out[(precision, jit)] = variant
    return out


def _rate(
    models: dict[tuple[str, bool], Any], x: np.ndarray, card: Any, batch: int, repeats: int
) -> dict[tuple[str, bool], float]:
    from segray import inference

    for model in models.values():  # compile every variant first
        inference.infer(model, x[:batch], card, batch)
    rates: dict[tuple[str, bool], list[float]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            start = time.perf_counter()
            inference.infer(model, x, card, batch)
            rates[key].append(len(x) / (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in rates.items()}


def _train_rate(card: Any, precision: str, x: np.ndarray, batch: int, epochs: int) -> float:
    import keras

    from segray.models import build_model
    from segray.models.precision import policy

    keras.mixed_precision.set_global_policy(policy(precision))
    try:
        keras.utils.set_random_seed(0)
        model = build_model(card.name, card.num_classes, tuple(card.input_shape), **card.options)
        y = (x[..., 0] > 0.5).astype(np.int32) % card.num_classes
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            if card.num_classes > 2
            else keras.losses.BinaryCrossentropy(from_logits=True),
        )
        target = y[..., None] if card.num_classes > 2 else y[..., None].astype(np.float32)
        times: list[float] = []
        timer = epoch_timer(times)
        model.fit(x, target, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
        return len(x) * (epochs - 1) / sum(times[1:])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _accuracy(model: Any, card: Any, data: str, precisions: list[str], batch: int) -> list[dict]:
    from segray import inference, metrics
    from segray.datasets import labels
    from segray.io import imagery
    from segray.models.precision import with_precision

    spec = labels.DatasetSpec(root=data, num_classes=card.num_classes, bands=card.bands)
    rows = [labels.load_sample(s, spec) for s in labels.find_samples(spec)]
    x = np.stack([inference.prepare(imagery.Tile(r["image"]), card) for r in rows])
    truth = np.stack([r["mask"] for r in rows])
    preds: dict[str, np.ndarray] = {}
    out = []
    for precision in precisions:
        variant = with_precision(model, precision)
        preds[precision] = inference.render(inference.infer(variant, x, card, batch), card)
        cm = metrics.ConfusionMatrix(card.num_classes)
        cm.update(truth, preds[precision])
        changed = float(np.mean(preds[precision] != preds[precisions[0]]))
        out.append({"precision": precision, "miou": float(cm.mean_iou), "changed": changed})
    return out


def bench_precision(
    model_uri: str | None,
    data: str | None,
    precisions: list[str],
    windows: int,
    batch: int,
    repeats: int,
    xla: bool,
    train_tiles: int,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three comparisons and print their tables; returns the figures."""
    import tempfile

    from segray import inference
    from segray.devtools.bench.tiles import _model
    from segray.models.precision import cpu_has_bf16

    tmp = None
    if model_uri is None:
        tmp = tempfile.TemporaryDirectory(prefix="segray-bench-precision-")
        model_uri = _model(tmp.name, 128)
    model, card = inference.load(model_uri, precision="fp32")
    echo(
        f"model {card.name} {card.input_shape} trained in {card.precision}; "
        f"CPU bf16 (AVX512-BF16/AMX): {cpu_has_bf16()}"
    )
    x = _windows(card, windows)
    rates = _rate(_variants(model, precisions, xla), x, card, batch, repeats)
    anchor = rates[("fp32", False)]
    echo(f"\npredict: {windows} windows, batch {batch}, median of {repeats} rounds")
    echo(f"{'precision':<10} {'xla':<4} {'windows/s':>10} {'x fp32':>7}")
    for (precision, jit), rate in rates.items():
        echo(f"{precision:<10} {'on' if jit else 'off':<4} {rate:>10.1f} {rate / anchor:>7.2f}")
    figures: dict[str, Any] = {
        "predict": {f"{p}{'+xla' if j else ''}": r for (p, j), r in rates.items()}
    }
    if train_tiles:
        xt = _windows(card, train_tiles, seed=1)
        train = {p: _train_rate(card, p, xt, 8, 3) for p in precisions}
        echo(f"\ntrain (bare Keras fit, {train_tiles} tiles, batch 8, epochs 2-3)")
        echo(f"{'precision':<10} {'img/s':>8} {'x fp32':>7}")
        for p, rate in train.items():
            echo(f"{p:<10} {rate:>8.1f} {rate / train['fp32']:>7.2f}")
        figures["train"] = train
    if data:
        rows = _accuracy(model, card, data, precisions, batch)
        echo(f"\naccuracy on {data}")
        echo(f"{'precision':<10} {'mIoU':>7} {'delta':>7} {'pixels changed':>15}")
        for r in rows:
            delta = r["miou"] - rows[0]["miou"]
            echo(f"{r['precision']:<10} {r['miou']:>7.4f} {delta:>+7.4f} {r['changed']:>15.4%}")
        figures["accuracy"] = rows
    if tmp is not None:
        tmp.cleanup()
    return figures
