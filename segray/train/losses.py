"""Segmentation losses on logits, one value per sample, and `build_loss` to name sums of them.

Every loss maps ``(y_true, logits) -> (B,)``: labels are integer class ids ``(B, H, W)`` (or
``(B, H, W, 1)``), logits are ``(B, H, W, C)`` with ``C = 1`` for two classes (one sigmoid logit,
positive class 1) and ``C = num_classes`` otherwise (softmax). Values are not reduced over the
batch: the distributed step averages them over the global batch. Everything is ``keras.ops``
in float32, so it runs inside a compiled step under any backend and any mixed-precision policy.

Pixels labelled ``ignore_index`` (unlabelled, or no data in the image) count for nothing in any
loss: their label is replaced by 0 and their per-pixel terms by 0.

Per-class weights (``class_weights``, one per class including background):

- cross-entropy and focal: each pixel's loss is multiplied by the weight of its TRUE class and the
  sample's value is the plain mean over its pixels, ``sum(w * l) / (H * W)`` (Keras' convention
  for a ``sample_weight`` map). A per-sample normaliser ``sum(w)`` would cancel the weights in the
  many tiles holding a single class (all background), so it is not used.
- Dice and Jaccard (multiclass): the per-class scores are averaged with these weights,
  ``sum(w_c * d_c) / sum(w_c)``. For two classes these scores cover the foreground only, so the
  weights have no effect there.

`frequency_weights` derives such weights from a training set's class pixel counts; training uses
them for two-class runs given none (``TrainConfig.class_balance``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from keras import ops

from segray.metrics import logits_to_probabilities

Tensor = Any  # a backend tensor or a numpy array
LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES = ("ce", "bce", "dice", "jaccard", "focal")
"""Names `build_loss` accepts; "ce" means BCE on a two-class problem."""

_OPTIONS = {
    "ce": (),
    "bce": (),
    "dice": ("smooth",),
    "jaccard": ("smooth",),
    "focal": ("gamma", "alpha"),
}


def list_losses() -> list[str]:
    """The loss names `build_loss` accepts."""
    return list(LOSSES)


def frequency_weights(class_pixels: Sequence[int], power: float = 0.5) -> tuple[float, ...]:
    """Per-class weights ``∝ share ** -power`` from pixel counts, scaled so that the mean weight
    of a pixel is 1 (the loss keeps its size).

    ``power`` 1 is inverse frequency (every class adds the same total weight), 0.5 its square
    root, 0 no weighting. A class with no pixel gets the largest weight of the others.
    """
    counts = np.asarray(class_pixels, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"class_pixels must be >= 2 counts >= 0, not all 0; got {class_pixels}")
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1]; got {power}")
    share = counts / counts.sum()
    present = share > 0
    weights = np.ones_like(share)
    weights[present] = share[present] ** -power
    weights /= float(np.sum(share * weights))
    weights[~present] = weights[present].max()
    return tuple(round(float(w), 6) for w in weights)


# ---- shared preparation ------------------------------------------------------------------------


def _prepare(
    y_true: Tensor, logits: Tensor, ignore_index: int | None = None
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """int32 labels without a channel axis, float32 logits, the channel count, and the float32
    map of pixels that count (None when all do): label ``ignore_index`` counts for nothing and is
    replaced by 0 so that every label indexes a class."""
    logits = ops.cast(ops.convert_to_tensor(logits), "float32")
    labels = ops.convert_to_tensor(y_true)
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    channels = logits.shape[-1]
    if channels is None:
        raise ValueError(f"logits need a static channel axis last; got shape {logits.shape}")
    labels = ops.cast(labels, "int32")
    if ignore_index is None:
        return labels, logits, int(channels), None
    counts = labels != ignore_index
    return ops.where(counts, labels, 0), logits, int(channels), ops.cast(counts, "float32")


def _weights(class_weights: Sequence[float], num_classes: int) -> Tensor:
    weights = np.asarray(class_weights, dtype=np.float32).reshape(-1)
    if weights.size != num_classes or not np.all(weights >= 0) or not np.any(weights > 0):
        raise ValueError(
            f"class_weights must be {num_classes} non-negative numbers, not all 0; "
            f"got {list(class_weights)}"
        )
    return ops.convert_to_tensor(weights)


def _per_sample_mean(
    pixel_loss: Tensor,
    labels: Tensor,
    class_weights: Sequence[float] | None,
    num_classes: int,
    counts: Tensor | None = None,
) -> Tensor:
    """Mean over the non-batch axes of a per-pixel loss, each pixel weighted by its true class;
    pixels outside ``counts`` (ignored labels, no data) add nothing."""
    if class_weights is not None:
        pixel_loss = pixel_loss * ops.take(_weights(class_weights, num_classes), labels)
    if counts is not None:
        pixel_loss = pixel_loss * counts
    return ops.mean(pixel_loss, axis=tuple(range(1, len(pixel_loss.shape))))


def _binary_pixel_ce(labels: Tensor, logits: Tensor) -> Tensor:
    """Per-pixel BCE ``-log p_t`` from the single logit; stable for any logit magnitude."""
    x = logits[..., 0]
    y = ops.cast(labels, x.dtype)
    return ops.relu(x) - x * y + ops.log1p(ops.exp(-ops.abs(x)))


def _log_p_true(labels: Tensor, logits: Tensor, channels: int) -> Tensor:
    """Per-pixel log-softmax probability of the true class."""
    log_p = ops.log_softmax(logits, axis=-1)
    return ops.sum(ops.one_hot(labels, channels, dtype=log_p.dtype) * log_p, axis=-1)


# ---- the losses --------------------------------------------------------------------------------


def binary_cross_entropy(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Binary cross-entropy from one logit channel, per sample ``(B,)``.

    ``class_weights`` = (background weight, foreground weight), applied per pixel by true class.
    """
    labels, logits, channels, counts = _prepare(y_true, logits, ignore_index)
    if channels != 1:
        raise ValueError(f"binary cross-entropy needs 1 logit channel; got {channels}")
    return _per_sample_mean(_binary_pixel_ce(labels, logits), labels, class_weights, 2, counts)


def sparse_categorical_cross_entropy(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Softmax cross-entropy from C >= 2 logit channels and integer labels, per sample ``(B,)``.

    ``class_weights`` (one per class) multiply each pixel's loss by the weight of its true class.
    """
    labels, logits, channels, counts = _prepare(y_true, logits, ignore_index)
    if channels < 2:
        raise ValueError(f"categorical cross-entropy needs >= 2 logit channels; got {channels}")
    pixel_loss = -_log_p_true(labels, logits, channels)
    return _per_sample_mean(pixel_loss, labels, class_weights, channels, counts)


def cross_entropy(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """BCE for one logit channel, sparse categorical CE otherwise; per sample ``(B,)``."""
    if ops.convert_to_tensor(logits).shape[-1] == 1:
        return binary_cross_entropy(y_true, logits, class_weights, ignore_index)
    return sparse_categorical_cross_entropy(y_true, logits, class_weights, ignore_index)


def _soft_overlap(
    y_true: Tensor, logits: Tensor, ignore_index: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Per sample and class: soft intersection ``sum(p * t)`` and ``sum(p) + sum(t)``, (B, C'),
    over the pixels that count.

    Binary problems give the foreground column only (C' = 1).
    """
    labels, logits, channels, counts = _prepare(y_true, logits, ignore_index)
    probs = logits_to_probabilities(logits)
    if channels == 1:
        truth = ops.cast(ops.expand_dims(labels, -1), probs.dtype)
    else:
        truth = ops.one_hot(labels, channels, dtype=probs.dtype)
    if counts is not None:
        probs, truth = probs * counts[..., None], truth * counts[..., None]
    axes = tuple(range(1, len(probs.shape) - 1))
    intersection = ops.sum(probs * truth, axis=axes)
    total = ops.sum(probs, axis=axes) + ops.sum(truth, axis=axes)
    return intersection, total, channels


def _class_mean(scores: Tensor, class_weights: Sequence[float] | None, channels: int) -> Tensor:
    """(B, C') per-class scores -> (B,): the foreground column, or a (weighted) class mean."""
    if channels == 1:
        return scores[:, 0]
    if class_weights is None:
        return ops.mean(scores, axis=-1)
    weights = _weights(class_weights, channels)
    return ops.sum(scores * weights, axis=-1) / ops.sum(weights)


def soft_dice_loss(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    smooth: float = 1.0,
    ignore_index: int | None = None,
) -> Tensor:
    """``1 - soft Dice`` per sample ``(B,)``, Dice = ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)``.

    ``p`` are sigmoid/softmax probabilities, ``t`` the one-hot truth, sums over each sample's
    pixels. Binary: the foreground only; multiclass: the (``class_weights``-weighted) mean over
    classes. ``smooth`` ``s`` (default 1, one pixel's worth, small beside a tile) makes a class
    absent from a tile's truth score ~1 when it is also not predicted, instead of ~0, so such
    tiles neither add a constant ~1 per absent class nor lose the push towards predicting nothing.
    """
    intersection, total, channels = _soft_overlap(y_true, logits, ignore_index)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - _class_mean(dice, class_weights, channels)


def soft_jaccard_loss(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    smooth: float = 1.0,
    ignore_index: int | None = None,
) -> Tensor:
    """``1 - soft IoU`` per sample ``(B,)``, IoU = ``(sum(p t) + s) / (sum(p) + sum(t) - sum(p t)
    + s)``; classes, weights and ``smooth`` as in `soft_dice_loss`."""
    intersection, total, channels = _soft_overlap(y_true, logits, ignore_index)
    iou = (intersection + smooth) / (total - intersection + smooth)
    return 1.0 - _class_mean(iou, class_weights, channels)


def focal_loss(
    y_true: Tensor,
    logits: Tensor,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    ignore_index: int | None = None,
) -> Tensor:
    """Focal loss ``-a_t (1 - p_t)^gamma log(p_t)`` averaged over pixels, per sample ``(B,)``.

    ``p_t`` is the probability of the true class. Binary: ``a_t = alpha`` for class 1 and
    ``1 - alpha`` for class 0 (Lin et al. 2017; equals Keras' ``BinaryFocalCrossentropy`` with
    ``apply_class_balancing=True``). Multiclass: ``a_t = alpha`` for every class (Keras'
    ``CategoricalFocalCrossentropy``); use ``class_weights`` to favour classes.
    """
    if gamma < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal loss needs gamma >= 0 and alpha in [0, 1]; got {gamma}, {alpha}")
    labels, logits, channels, counts = _prepare(y_true, logits, ignore_index)
    if channels == 1:
        neg_log_pt = _binary_pixel_ce(labels, logits)
        y = ops.cast(labels, "float32")
        alpha_t = y * alpha + (1.0 - y) * (1.0 - alpha)
        num_classes = 2
    else:
        neg_log_pt = -_log_p_true(labels, logits, channels)
        alpha_t = alpha
        num_classes = channels
    p_t = ops.exp(-neg_log_pt)
    pixel_loss = alpha_t * ops.power(1.0 - p_t, gamma) * neg_log_pt
    return _per_sample_mean(pixel_loss, labels, class_weights, num_classes, counts)


_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy,
    "bce": binary_cross_entropy,
    "dice": soft_dice_loss,
    "jaccard": soft_jaccard_loss,
    "focal": focal_loss,
}


# ---- named weighted sums -----------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """A named loss ``(y_true, logits) -> (B,)``: the weighted sum of its ``terms``.

    ``terms`` are ``(weight, name, function)``; ``num_classes`` is checked against the logits.
    """

    name: str
    num_classes: int
    terms: tuple[tuple[float, str, LossFn], ...]

    def __call__(self, y_true: Tensor, logits: Tensor) -> Tensor:
        """The per-sample loss, shape ``(B,)``."""
        channels = ops.convert_to_tensor(logits).shape[-1]
        expected = 1 if self.num_classes == 2 else self.num_classes
        if channels != expected:
            raise ValueError(
                f"loss {self.name!r} for {self.num_classes} classes expects {expected} logit "
                f"channel(s); got logits of shape {tuple(logits.shape)}"
            )
        total = None
        for weight, _, fn in self.terms:
            value = fn(y_true, logits)
            value = value if weight == 1.0 else weight * value
            total = value if total is None else total + value
        return total


def _parse_spec(spec: str | Mapping[str, float] | Sequence[str]) -> list[tuple[float, str]]:
    """``"0.7*ce+0.3*dice"`` / ``{"ce": 0.7, "dice": 0.3}`` / ``["ce", "dice"]`` -> (w, name)."""
    if isinstance(spec, Mapping):
        terms = [(float(weight), str(name)) for name, weight in spec.items()]
    else:
        text = spec if isinstance(spec, str) else "+".join(str(item) for item in spec)
        terms = []
        for term in text.split("+"):
            weight, _, name = term.strip().rpartition("*")
            try:
                terms.append((float(weight) if weight.strip() else 1.0, name.strip().lower()))
            except ValueError:
                raise ValueError(f"bad loss term {term.strip()!r} in {spec!r}") from None
    if not terms:
        raise ValueError(f"empty loss spec {spec!r}; allowed names: {', '.join(LOSSES)}")
    for weight, name in terms:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; allowed: {', '.join(LOSSES)}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss weights must be finite and >= 0; got {weight} for {name!r}")
    return terms


def build_loss(
    spec: str | Mapping[str, float] | Sequence[str],
    num_classes: int,
    class_weights: Sequence[float] | None = None,
    options: Mapping[str, Mapping[str, float]] | None = None,
    ignore_index: int | None = None,
) -> Loss:
    """A `Loss` from a spec: ``"ce"``, ``"ce+dice"``, ``"0.7*ce+0.3*dice"``, a ``{name: weight}``
    dict, or a list of such terms. Names are in `LOSSES`; ``"ce"`` on two classes is BCE.

    ``class_weights`` (``num_classes`` values) go to every term. ``options`` give per-name keyword
    arguments: ``{"focal": {"gamma": 1.0, "alpha": 0.5}, "dice": {"smooth": 1e-5}}``. Pixels
    labelled ``ignore_index`` (unlabelled, or no data in the image) count in no term.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if class_weights is not None:
        _weights(class_weights, num_classes)  # validate now, not at the first step
    options = dict(options or {})
    for name, kwargs in options.items():
        allowed = _OPTIONS.get(name)
        if allowed is None or set(kwargs) - set(allowed):
            raise ValueError(
                f"bad options for loss {name!r}: {dict(kwargs)}; allowed: "
                + "; ".join(f"{k}: {', '.join(v) or '(none)'}" for k, v in _OPTIONS.items())
            )
    terms = []
    for weight, name in _parse_spec(spec):
        if name == "bce" and num_classes != 2:
            raise ValueError(f"'bce' needs num_classes == 2; got {num_classes} (use 'ce')")
        fn = partial(
            _FUNCTIONS[name],
            class_weights=class_weights,
            ignore_index=ignore_index,
            **options.get(name, {}),
        )
        terms.append((weight, name, fn))
    label = "+".join(name if weight == 1.0 else f"{weight:g}*{name}" for weight, name, _ in terms)
    return Loss(name=label, num_classes=int(num_classes), terms=tuple(terms))
