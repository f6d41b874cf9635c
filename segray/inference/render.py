"""From logits to what a user asked for: class masks, a binary mask, probabilities, uncertainty,
class fractions and footprints; and the class colours every picture and mask uses."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from segray.io.bands import NODATA_CLASS
from segray.io.footprints import WGS84

if TYPE_CHECKING:
    from segray.io.imagery import Tile
    from segray.models.saving import ModelCard


#: What a mask holds: class ids, 1 where one class is predicted, or its probability x 254.
Output = Literal["classes", "binary", "probability"]
OUTPUTS: tuple[str, ...] = get_args(Output)
#: Class colours by class id, the same in every mask, overlay and synthetic collection:
#: background, building, road, water, vegetation, then a few more.
PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (255, 225, 25),
    (0, 130, 200),
    (60, 180, 75),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
)


def mask_legend(card: ModelCard, output: str = "classes", class_index: int = 1) -> dict[str, Any]:
    """What a GIS needs to read a mask, as ``encode_mask`` keywords: the colour table
    (``palette``) of class-id and binary masks, and ``tags`` naming the classes, or saying a
    probability mask's scale (value / 254). Every mask holds :data:`NODATA` where the input
    was no data."""
    names = card.names()
    if output == "probability":
        return {"tags": {"PROBABILITY_OF": names[class_index], "SCALE": str(1 / PROBABILITY_MAX)}}
    if output == "binary":
        palette = [PALETTE[0], PALETTE[class_index % len(PALETTE)]]
        return {
            "palette": palette,
            "tags": {"CLASS_NAMES": json.dumps(["other", names[class_index]])},
        }
    palette = [PALETTE[i % len(PALETTE)] for i in range(card.num_classes)]
    return {"palette": palette, "tags": {"CLASS_NAMES": json.dumps(names)}}


#: The value of every output pixel whose input pixel was no data (the GeoTIFF nodata value).
NODATA = NODATA_CLASS
#: The value of probability 1 (and of the largest uncertainty): 255 is :data:`NODATA`.
PROBABILITY_MAX = 254
#: Metadata of the uncertainty maps written beside masks.
UNCERTAINTY_TAGS = {
    "UNCERTAINTY": "predictive entropy / ln(classes)",
    "SCALE": str(1 / PROBABILITY_MAX),
}


def mark_nodata(logits: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Logits (…, H, W, K) with NaN at the pixels that were no data (``valid`` (H, W) False):
    NaN survives stitching and blending of windows, and :func:`render` turns it into
    :data:`NODATA` in every output."""
    if valid is None or valid.all():
        return logits
    return np.where(valid[..., None], logits, np.float32(np.nan)).astype(logits.dtype)


def _nodata(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits with NaN replaced by 0, and the (…, H, W) map of no-data pixels (None: none)."""
    logits = np.asarray(logits)
    if not np.issubdtype(logits.dtype, np.floating):
        return logits, None
    missing = np.isnan(logits).any(axis=-1)
    if not missing.any():
        return logits, None
    return np.nan_to_num(logits, nan=0.0), missing


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
    probability of ``class_index`` scaled to 0..254. Pixels whose logits are NaN
    (:func:`mark_nodata`) are :data:`NODATA` in all three.
    """
    logits, missing = _nodata(logits)
    mask = _render(logits, card, output, class_index, threshold)
    if missing is not None:
        mask[missing] = NODATA
    return mask


def _render(
    logits: np.ndarray, card: ModelCard, output: str, class_index: int, threshold: float | None
) -> np.ndarray:
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
            return np.round(p * PROBABILITY_MAX).astype(np.uint8)
        return (p >= t).astype(np.uint8)
    labels = np.asarray(metrics.logits_to_labels(logits, threshold=t)).astype(np.uint8)
    return (labels == class_index).astype(np.uint8) if output == "binary" else labels


def render_outputs(
    logits: np.ndarray,
    card: ModelCard,
    output: str = "classes",
    class_index: int = 1,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)``: the mask :func:`render` gives, and the class-id mask at the same
    threshold, from which a job's class fractions and footprints are taken (one array when the
    mask is the class-id mask)."""
    labels = render(logits, card, "classes", threshold=threshold)
    if output == "classes":
        return labels, labels
    return render(logits, card, output, class_index, threshold), labels


def logits_of(p: np.ndarray) -> np.ndarray:
    """Logits whose probabilities are ``p`` (log p for softmax, logit p for one sigmoid channel),
    so :func:`render` applies the one threshold rule to averaged predictions unchanged."""
    eps = 1e-7
    p = np.clip(p, eps, 1 - eps)
    if p.shape[-1] == 1:
        return np.log(p / (1 - p)).astype(np.float32)
    return np.log(p).astype(np.float32)


def render_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The probability of each pixel's class in ``labels`` (a binary model's 1 - p for class 0)
    as uint8 0..254, from the logits (..., H, W, K); 0 where the logits are NaN (no data)."""
    from segray import metrics

    logits = np.asarray(logits)
    probs = np.asarray(metrics.logits_to_probabilities(np.nan_to_num(logits, nan=0.0)))
    if probs.shape[-1] == 1:
        p = np.where(np.asarray(labels) == 1, probs[..., 0], 1.0 - probs[..., 0])
    else:
        k = np.minimum(np.asarray(labels), probs.shape[-1] - 1)[..., None].astype(np.intp)
        p = np.take_along_axis(probs, k, axis=-1)[..., 0]
    out = np.round(np.clip(p, 0.0, 1.0) * PROBABILITY_MAX).astype(np.uint8)
    out[np.isnan(logits).any(axis=-1)] = 0
    return out


def render_uncertainty(entropy: np.ndarray) -> np.ndarray:
    """The uint8 uncertainty map of an entropy in [0, 1] (:func:`infer_mc`): round(254 x it),
    and :data:`NODATA` where the entropy is NaN (no data)."""
    entropy = np.asarray(entropy)
    out = np.round(np.clip(np.nan_to_num(entropy), 0.0, 1.0) * PROBABILITY_MAX).astype(np.uint8)
    out[np.isnan(entropy)] = NODATA
    return out


def footprint_doc(
    labels: np.ndarray,
    like: Tile,
    class_index: int,
    name: str | None = None,
    to_crs: str = WGS84,
) -> dict[str, Any]:
    """GeoJSON polygons of ``class_index`` in a class-id mask, simplified by half a pixel, in
    ``to_crs`` (RFC 7946 WGS84 by default, ``native`` for ``like``'s CRS; pixels when it has no
    georeference): bulk ``footprints`` and Serve's JSON."""
    from segray.io.footprints import footprints

    transform = like.transform
    simplify = abs(transform.a) / 2 if transform is not None else 0.5
    return footprints(
        labels,
        class_index,
        transform=transform,
        crs=like.crs,
        simplify=simplify,
        name=name,
        to_crs=to_crs,
    )


def class_fractions(mask: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of the mask's data pixels in each class id (:data:`NODATA` pixels are left out;
    NaN for each class when no pixel is data)."""
    counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return (counts / total).tolist() if total else [float("nan")] * num_classes
