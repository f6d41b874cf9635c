"""From decoded tiles to masks: the one preparation and output rule of bulk, Serve and eval.

``load`` loads a model for inference; ``prepare`` checks bands and normalises exactly as training
did (the model card says how); ``infer`` runs the compiled model on a batch of any size, padding to
the model's input multiple and cropping back; ``infer_stacks`` runs the window stacks of many
images together; ``render`` turns logits into the mask a user asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.errors import TileError
from segray.inference import tta as augment
from segray.inference.render import logits_of
from segray.inference.tiling import BLEND, OVERLAP, cut_windows, join_windows, pad_to
from segray.io import bands, imagery
from segray.io.imagery import Tile

if TYPE_CHECKING:
    from segray.io.files import FileSystem
    from segray.models.saving import ModelCard

log = logging.getLogger("segray.inference")

#: Windows per model call: the default batch of bulk jobs, Serve and evaluation.
BATCH_SIZE = 16


def load(
    uri: str,
    fs: FileSystem | None = None,
    card: ModelCard | None = None,
    precision: str | None = None,
    runtime: str = "keras",
) -> tuple[Any, ModelCard]:
    """A model and its card, loaded for inference (by a Predictor actor or a Serve replica);
    ``fs`` holds the model, a ``card`` already read is not read again. The model computes in
    ``precision`` (default: the card's, the one it was trained in; :mod:`segray.models.
    precision`). ``runtime`` onnx opens the model's ONNX export in ONNX Runtime instead
    (:mod:`segray.inference.onnx`), without importing Keras."""
    if runtime == "onnx":
        from segray.inference.onnx import load_onnx

        return load_onnx(uri, fs, card, precision)
    from segray.models import saving
    from segray.models.lean import import_keras

    import_keras()  # first in the process: without scikit-learn and pyplot (1.1 s of 5.4)
    gpu_memory_growth()
    model, card = saving.load_model(uri, fs, card)
    return set_precision(model, precision or card.precision), card


def set_precision(model: Any, precision: str) -> Any:
    """``model`` computing in ``precision``, with a note where that is slow on this hardware."""
    from segray.models import precision as precisions

    note = precisions.advice(precision, gpu=_has_gpu())
    if note:
        log.warning("--precision %s: %s", precision, note)
    return precisions.with_precision(model, precision)


def _has_gpu() -> bool:
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if keras.backend.backend() == "jax":
        import jax

        return any(d.platform != "cpu" for d in jax.devices())
    return False


def gpu_memory_growth() -> None:
    """Let several actors or replicas share one GPU: TensorFlow otherwise takes all its memory."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass


def prepare(tile: Tile, card: ModelCard, nodata: float | None = None) -> np.ndarray:
    """Check the pixel type against the card's, select the card's bands, check the band count,
    and normalise to float32 (H, W, C) by the card's rule.

    ``tile.valid`` is completed with ``nodata`` (else the card's) where the file sets no nodata
    value; its no-data pixels go into the model as 0, and :func:`~segray.inference.render.
    mark_nodata` with ``tile.valid`` makes them no data in every output."""
    bands.apply_nodata(tile, card.nodata if nodata is None else nodata)
    array = tile.array
    check_pixel_type(str(array.dtype), card, tile.source)
    if card.bands and array.shape[-1] != card.channels:
        array = imagery.select_bands(array, card.bands, tile.source)
    if array.shape[-1] != card.channels:
        raise TileError(
            tile.source,
            f"has {array.shape[-1]} band(s) but the model expects {card.channels}; "
            "select bands with --bands",
            "bands",
        )
    return card.normalize_pixels(array, tile.valid)


def check_pixel_type(dtype: str, card: ModelCard, source: str) -> None:
    """Refuse pixels of another type than the model was trained on: rescaled blindly, uint16
    tiles through a uint8 model give a confident wrong mask, never an error."""
    if card.dtype and dtype != card.dtype:
        reason = (
            f"has pixel type {dtype} but the model was trained on {card.dtype}: convert the "
            "image to that type, or train a model on this one"
        )
        raise TileError(source, reason, "pixel_type")


def model_size(model: Any, card: ModelCard, height: int, width: int) -> tuple[int, int]:
    """The spatial size to run an (height, width) batch at: the model's fixed input size, or the
    next multiple of the card's ``input_multiple`` for size-flexible models."""
    fixed = tuple(getattr(model, "input_shape", (None, None, None))[1:3])
    m = card.input_multiple
    return (
        fixed[0] or -(-height // m) * m,
        fixed[1] or -(-width // m) * m,
    )


def model_window(model: Any) -> tuple[int, int] | None:
    """The model's fixed input ``(height, width)``, or None for a size-flexible model."""
    size = tuple(getattr(model, "input_shape", (None, None, None))[1:3])
    return size if all(isinstance(v, int) for v in size) else None  # type: ignore[return-value]


def infer(
    model: Any,
    batch: np.ndarray,
    card: ModelCard,
    batch_size: int = BATCH_SIZE,
    tta: str = "none",
) -> np.ndarray:
    """Logits (B, H, W, K) as numpy for a prepared float32 batch no larger than the model input.

    Smaller images are padded up to the model's size and the logits cropped back; larger images
    go through :func:`segray.inference.tiling.cut_windows` first (bulk and Serve do this). At most
    ``batch_size`` images go to the model per call. With ``tta`` (:mod:`segray.inference.tta`),
    the logits are those of the class probabilities averaged over the batch's flips or turns.
    """
    batch = np.asarray(batch, np.float32)
    h, w = batch.shape[1:3]
    size = model_size(model, card, h, w)
    if h > size[0] or w > size[1]:
        raise ValueError(f"a {h}x{w} batch is larger than the model input {size}: tile it first")
    views = augment.symmetries(tta)
    if augment.needs_square(tta) and size[0] != size[1]:
        if model_window(model) is not None:
            raise ValueError(
                f"tta {tta}: the model's {size[0]}x{size[1]} input cannot turn by a quarter; "
                "use --tta flips"
            )
        size = (max(size), max(size))
    x = pad_to(batch, size)
    step = max(1, batch_size)
    if len(views) > 1:  # every view of the batch in the same calls, then turned back
        x = np.concatenate([augment.apply(x, view) for view in views])
    logits = np.concatenate(
        [_predict(model, x[i : i + step], step) for i in range(0, len(x), step)]
    )
    if len(views) > 1:
        parts = np.split(logits, len(views))
        probs = sum(
            _probabilities(augment.undo(part, view))
            for part, view in zip(parts, views, strict=True)
        )
        logits = logits_of(probs / len(views))
    return logits[:, :h, :w, :]


def _probabilities(logits: np.ndarray) -> np.ndarray:
    from segray import metrics

    return np.asarray(metrics.logits_to_probabilities(logits), np.float32)


def _predict(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """One compiled model call (Keras caches ``predict_function``; eager calls cost ~10x more).

    Where the compiled function is specialised per input shape (XLA on a GPU, JAX), the batch is
    padded up to a power of two (at most ``batch_size``), so that a server whose batches take
    every size from 1 to ``batch_size`` compiles a handful of programs, not one per size.
    """
    if not hasattr(model, "predict_on_batch"):  # a plain callable
        return np.asarray(model(x, training=False), np.float32)
    n = len(x)
    if _shape_specialised(model):
        bucket = min(1 << (n - 1).bit_length(), max(batch_size, n))
        x = np.concatenate([x, np.repeat(x[-1:], bucket - n, axis=0)]) if bucket > n else x
    return np.asarray(model.predict_on_batch(x)).astype(np.float32, copy=False)[:n]


def _shape_specialised(model: Any) -> bool:
    import keras

    return keras.backend.backend() == "jax" or bool(getattr(model, "jit_compile", False))


def warm_up(model: Any, card: ModelCard, batch_size: int = BATCH_SIZE) -> None:
    """Compile the model's predict function before the first request needs it: for each
    power-of-two batch size up to ``batch_size`` (the sizes :func:`infer` pads to under XLA or
    JAX; TensorFlow's relaxed trace covers every size after the second)."""
    sizes = {1 << i for i in range(batch_size.bit_length())} | {batch_size}
    for n in sorted(s for s in sizes if s <= batch_size):
        infer(model, np.zeros((n, *card.input_shape), np.float32), card, batch_size)


def infer_stacks(
    model: Any,
    stacks: Sequence[np.ndarray],
    card: ModelCard,
    batch_size: int = BATCH_SIZE,
    mc_samples: int = 0,
    tta: str = "none",
) -> list[np.ndarray | Exception]:
    """Logits of many window stacks (n_i, h, w, C), each the windows of one image, in few calls.

    Stacks of one shape share model calls of up to ``batch_size`` windows. A shape group that
    fails gives each of its stacks the exception instead of logits, so one bad image spoils no
    other. With ``mc_samples`` > 0 (:func:`infer_mc`), each result has one more channel, last: the
    uncertainty, which is then stitched with the logits. ``tta``: see :func:`infer`.
    """
    groups: dict[tuple, list[int]] = {}
    for i, stack in enumerate(stacks):
        groups.setdefault(stack.shape[1:], []).append(i)
    out: list[Any] = [None] * len(stacks)
    for rows in groups.values():
        windows = np.concatenate([stacks[i] for i in rows])
        try:
            if mc_samples:
                logits, entropy = infer_mc(model, windows, card, mc_samples, batch_size, tta)
                logits = np.concatenate([logits, entropy[..., None]], axis=-1)
            else:
                logits = infer(model, windows, card, batch_size, tta)
        except Exception as exc:  # handed to the caller, per image: one bad image spoils no other
            for i in rows:
                out[i] = exc
            continue
        splits = np.cumsum([len(stacks[i]) for i in rows])[:-1]
        for i, part in zip(rows, np.split(logits, splits), strict=True):
            out[i] = part
    return out


def infer_mc(
    model: Any,
    batch: np.ndarray,
    card: ModelCard,
    samples: int,
    batch_size: int = BATCH_SIZE,
    tta: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo dropout: ``samples`` stochastic passes → (logits of the mean, uncertainty).

    The returned logits are those of the mean probability (log p for softmax, logit p for one
    sigmoid channel), so :func:`render` applies the one threshold rule to them unchanged. The
    uncertainty is the predictive entropy of the mean, scaled to [0, 1] by its maximum log K.
    Models without Monte-Carlo dropout layers give identical passes, so they run one.

    Monte-Carlo mode is switched on for the call and back off after, unless it was on already: a
    bulk job switches it on once, since every switch recompiles the model's predict function.
    """
    from segray.models.layers import monte_carlo_layers, set_monte_carlo

    if samples < 1:
        raise ValueError(f"mc_samples must be ≥ 1; got {samples}")
    layers = monte_carlo_layers(model)
    was_on = any(layer.monte_carlo for layer in layers)
    if not layers:
        samples = 1
    elif not was_on:
        set_monte_carlo(model, True)
    try:
        total = sum(
            _probabilities(infer(model, batch, card, batch_size, tta)) for _ in range(samples)
        )
    finally:
        if layers and not was_on:
            set_monte_carlo(model, False)
    eps = 1e-7
    p = np.clip(total / samples, eps, 1 - eps)
    if p.shape[-1] == 1:
        q = p[..., 0]
        entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q)) / np.log(2)
    else:
        entropy = -(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])
    return logits_of(p), entropy.astype(np.float32)


def monte_carlo_enabled(model: Any) -> bool:
    """True when the model has Monte-Carlo dropout layers and they are switched on."""
    from segray.models.layers import monte_carlo_layers

    return any(layer.monte_carlo for layer in monte_carlo_layers(model))


def infer_images(
    model: Any,
    images: Sequence[np.ndarray],
    card: Any,
    overlap: int = OVERLAP,
    blend: str = BLEND,
    batch_size: int = BATCH_SIZE,
    mc_samples: int = 0,
    tta: str = "none",
) -> list[np.ndarray | Exception]:
    """Logits (H, W, K) of prepared images of any size: cut into model-sized windows, the windows
    of all images run in few batched calls, stitched back. An image whose shape group fails gets
    the exception instead (with ``mc_samples``, the uncertainty is one more, last channel)."""
    window = model_window(model)
    cuts = [cut_windows(image, window, overlap) for image in images]
    stacks = infer_stacks(
        model, [windows for windows, _ in cuts], card, batch_size, mc_samples, tta
    )
    return [
        result if isinstance(result, Exception) else join_windows(result, layout, blend)
        for (_, layout), result in zip(cuts, stacks, strict=True)
    ]
