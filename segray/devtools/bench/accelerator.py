"""A saved model's throughput per precision on whatever accelerator Keras finds, in one call.

Made for the lent GPU machine, which has JAX (and PyTorch, CuPy) but neither TensorFlow nor Ray:
this module imports only the standard library, numpy, keras and segray's model zoo (which imports
keras alone), so it runs on the JAX backend with nothing else installed. From the repository root::

    pip install --no-index --find-links wheels/ keras   # keras and its pure-Python deps, carried
    KERAS_BACKEND=jax python -m segray.devtools.bench.accelerator \\
        --model runs/demo/run/model.keras --json $OUT/accelerator.json

Without ``--model`` it builds the card's default model (a U-Net at 128 px) with random weights.
Each precision gets a model of its own with the same float32 weights
(:func:`segray.models.precision.with_precision`); every round runs the same windows through each
of them in turn (interleaved, so drift on a shared machine hits all alike) with the same compiled
call (``predict_on_batch``); figures are the median over rounds, windows/s and the ratio to fp32,
and the share of pixels whose class differs from fp32's on the same windows. The JSON also names
the backend, the devices and which heavy modules got imported (none of TensorFlow or Ray, on JAX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Modules whose presence in ``sys.modules`` the report lists: what the run really needed.
HEAVY = ("tensorflow", "ray", "torch", "jax", "sklearn", "matplotlib", "rasterio")


def _devices() -> list[str]:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices()]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices()]
    return ["unknown"]


def _load(model: str | None, size: int, classes: int, base_filters: int) -> Any:
    from segray.models import build_model, load_keras

    if model is None:
        import keras

        keras.utils.set_random_seed(0)
        return build_model("unet", classes, (size, size, 3), base_filters=base_filters)
    path = Path(model)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise SystemExit(f"--model: no .keras file at {path}")
    return load_keras(path)


def run(
    model: str | None = None,
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16"),
    windows: int = 256,
    batch: int = 32,
    repeats: int = 5,
    size: int = 128,
    classes: int = 5,
    base_filters: int = 32,
) -> dict[str, Any]:
    """Measure and return the report (see the module docstring)."""
    import keras

    from segray.models.precision import with_precision

    if precisions[0] != "fp32":
        precisions = ("fp32", *[p for p in precisions if p != "fp32"])
    base = _load(model, size, classes, base_filters)
    shape = tuple(int(d) for d in base.input_shape[1:])
    x = np.random.default_rng(0).random((windows, *shape), np.float32)
    batches = [x[i : i + batch] for i in range(0, windows, batch)]
    variants = {p: with_precision(base, p) for p in precisions}

    def predict(m: Any) -> np.ndarray:
        return np.concatenate([np.asarray(m.predict_on_batch(b), np.float32) for b in batches])

    first = {}
    for p, m in variants.items():  # compile each variant (every batch shape) before timing
        first[p] = predict(m)
    rates: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(repeats):
        for p, m in variants.items():
            start = time.perf_counter()
            predict(m)
            rates[p].append(windows / (time.perf_counter() - start))
    median = {p: statistics.median(r) for p, r in rates.items()}

    def classes_of(y: np.ndarray) -> np.ndarray:
        return (y[..., 0] > 0) if y.shape[-1] == 1 else np.argmax(y, -1)

    ref = classes_of(first["fp32"])
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "devices": _devices(),
        "model": model or f"unet base_filters={base_filters} (random weights)",
        "input_shape": list(shape),
        "windows": windows,
        "batch": batch,
        "repeats": repeats,
        "rows": [
            {
                "precision": p,
                "windows_per_s": median[p],
                "x_fp32": median[p] / median["fp32"],
                "pixels_changed": float(np.mean(classes_of(first[p]) != ref)),
            }
            for p in precisions
        ],
        "imported": sorted(m for m in HEAVY if m in sys.modules),
    }


def table(report: dict[str, Any]) -> str:
    """The report as the text table the bench prints."""
    lines = [
        f"{report['backend']} on {', '.join(report['devices'])}; {report['model']} "
        f"{tuple(report['input_shape'])}, {report['windows']} windows, batch {report['batch']}, "
        f"median of {report['repeats']} rounds",
        f"{'precision':<10} {'windows/s':>10} {'x fp32':>7} {'pixels changed':>15}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['precision']:<10} {r['windows_per_s']:>10.1f} {r['x_fp32']:>7.2f} "
            f"{r['pixels_changed']:>15.4%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a .keras file or a run folder (default: a fresh U-Net)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="window size without --model")
    parser.add_argument("--base-filters", type=int, default=32, help="U-Net width without --model")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    from segray.models.precision import PRECISIONS

    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        parser.error(f"--precisions takes {', '.join(PRECISIONS)}; got {args.precisions!r}")
    for name in ("windows", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    report = run(
        args.model,
        precisions,
        args.windows,
        args.batch,
        args.repeats,
        args.size,
        base_filters=args.base_filters,
    )
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")  # the accelerator machine has no TensorFlow
    sys.exit(main())
