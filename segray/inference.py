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


def pad_to_multiple(batch: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (B, H, W, C) so H and W are multiples of ``multiple``; returns the old (H, W)."""
    h, w = batch.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "edge"
        batch = np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
    return batch, (h, w)


def infer(model: Any, batch: np.ndarray, card: ModelCard, mc_samples: int = 0) -> np.ndarray:
    """Logits (B, H, W, K) as numpy for a prepared float32 batch of any spatial size."""
    padded, (h, w) = pad_to_multiple(np.asarray(batch, np.float32), card.input_multiple)
    logits = np.asarray(model(padded, training=False))
    return logits[:, :h, :w, :]


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
