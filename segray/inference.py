"""From decoded tiles to masks: the one preparation and output rule of bulk, Serve and eval.

``prepare`` checks bands and normalises exactly as training did (the model card says how);
``infer`` runs the model on a batch of any size, padding to the model's input multiple and
cropping back; ``render`` turns logits into the mask a user asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from segray import imagery
from segray.imagery import Tile, TileError

if TYPE_CHECKING:
    from segray.modelio import ModelCard

OUTPUTS = ("classes", "binary", "probability")


def prepare(tile: Tile, card: ModelCard) -> np.ndarray:
    """Select the card's bands, check the band count, and normalise to float32 (H, W, C)."""
    array = tile.array
    if card.bands and array.shape[-1] != card.channels:
        array = imagery.select_bands(array, card.bands, tile.source)
    if array.shape[-1] != card.channels:
        raise TileError(
            tile.source,
            f"has {array.shape[-1]} band(s) but the model expects {card.channels}; "
            "select bands with --bands",
        )
    return imagery.normalize(array, card.scale)


def pad_to(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reflect-pad (B, H, W, C) at the bottom and right up to ``size`` (edge-pad when too small
    to reflect)."""
    ph, pw = size[0] - batch.shape[1], size[1] - batch.shape[2]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {batch.shape[1:3]} down to {size}")
    if ph == 0 and pw == 0:
        return batch
    mode = "reflect" if ph < batch.shape[1] and pw < batch.shape[2] else "edge"
    return np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def model_size(model: Any, card: ModelCard, height: int, width: int) -> tuple[int, int]:
    """The spatial size to run an (height, width) batch at: the model's fixed input size, or the
    next multiple of the card's ``input_multiple`` for size-flexible models."""
    fixed = tuple(getattr(model, "input_shape", (None, None, None))[1:3])
    m = card.input_multiple
    return (
        fixed[0] or -(-height // m) * m,
        fixed[1] or -(-width // m) * m,
    )


def infer(model: Any, batch: np.ndarray, card: ModelCard) -> np.ndarray:
    """Logits (B, H, W, K) as numpy for a prepared float32 batch no larger than the model input.

    Smaller batches are padded up to the model's size and the logits cropped back; larger images
    go through :mod:`segray.tiling` windows first (bulk ``--scene`` and Serve do this).
    """
    batch = np.asarray(batch, np.float32)
    h, w = batch.shape[1:3]
    size = model_size(model, card, h, w)
    if h > size[0] or w > size[1]:
        raise ValueError(f"a {h}x{w} batch is larger than the model input {size}: tile it first")
    logits = np.asarray(model(pad_to(batch, size), training=False))
    return logits[:, :h, :w, :]


def infer_mc(
    model: Any, batch: np.ndarray, card: ModelCard, samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo dropout: ``samples`` stochastic passes → (logits of the mean, uncertainty).

    The returned logits are those of the mean probability (log p for softmax, logit p for one
    sigmoid channel), so :func:`render` applies the one threshold rule to them unchanged. The
    uncertainty is the predictive entropy of the mean, scaled to [0, 1] by its maximum log K.
    Models without Monte-Carlo dropout layers give identical passes and zero-ish uncertainty.
    """
    from segray import metrics
    from segray.models import set_monte_carlo

    if samples < 1:
        raise ValueError(f"mc_samples must be ≥ 1; got {samples}")
    set_monte_carlo(model, True)
    try:
        probs = np.mean(
            [
                np.asarray(metrics.logits_to_probabilities(infer(model, batch, card)))
                for _ in range(samples)
            ],
            axis=0,
        )
    finally:
        set_monte_carlo(model, False)
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    if p.shape[-1] == 1:
        q = p[..., 0]
        entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q)) / np.log(2)
        return np.log(q / (1 - q))[..., None], entropy.astype(np.float32)
    entropy = -(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])
    return np.log(p), entropy.astype(np.float32)


def render(
    logits: np.ndarray,
    card: ModelCard,
    output: str = "classes",
    class_index: int = 1,
    threshold: float | None = None,
) -> np.ndarray:
    """uint8 masks (B, H, W) from logits.

    ``classes``: class ids (binary models threshold at the card's threshold); ``binary``: 1 where
    ``class_index`` is predicted (or its probability ≥ ``threshold``), else 0; ``probability``: the
    probability of ``class_index`` scaled to 0..255.
    """
    from segray import metrics

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
    if not 0 <= class_index < card.num_classes:
        raise ValueError(f"class_index must lie in 0..{card.num_classes - 1}; got {class_index}")
    t = card.threshold if threshold is None else threshold
    if output == "probability" or (output == "binary" and threshold is not None):
        probs = np.asarray(metrics.logits_to_probabilities(logits))
        p = probs[..., 0] if probs.shape[-1] == 1 else probs[..., class_index]
        if probs.shape[-1] == 1 and class_index == 0:
            p = 1.0 - p
        if output == "probability":
            return np.round(p * 255).astype(np.uint8)
        return (p >= t).astype(np.uint8)
    labels = np.asarray(metrics.logits_to_labels(logits, threshold=t)).astype(np.uint8)
    return (labels == class_index).astype(np.uint8) if output == "binary" else labels


def class_fractions(mask: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of the mask's pixels in each class id."""
    counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
    return (counts / max(mask.size, 1)).tolist()
