"""Segmentation metrics from one confusion matrix, and the one rule turning logits into classes.

Every score here (pixel accuracy, IoU, Dice/F1, precision, recall) is computed by numpy from a
``(num_classes, num_classes)`` confusion matrix, rows = truth, columns = prediction (scikit-learn's
convention). Both paths produce that matrix with the same pair-index formula: `confusion_matrix`
with ``keras.ops`` inside a training/validation step (so replicas can sum it), and
`ConfusionMatrix.update` with numpy for evaluation on masks, which therefore needs no keras.

Absent classes: a class absent from BOTH truth and prediction has an undefined IoU/Dice (0/0), which
is reported as NaN and left out of the means (a NaN-skipping mean; the mean of nothing is NaN). A
class absent from the truth but predicted somewhere scores IoU = Dice = 0, and so does a class
present in the truth but never predicted. Precision is NaN for a class never predicted, recall is
NaN for a class absent from the truth.

Only `logits_to_labels`, `logits_to_probabilities` and `confusion_matrix` import keras, and they do
so when called on backend tensors: on numpy arrays the first two apply the same rule with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Tensor = Any  # a numpy array or a backend tensor accepted by keras.ops


# ---- logits -> classes: the single threshold rule used by train, eval, bulk and Serve ----------


def logits_to_probabilities(logits: Tensor) -> Tensor:
    """Probabilities from logits of shape ``(..., C)``, with ``keras.ops``.

    Binary models (``C == 1``) give ``sigmoid(logits)``: P(class 1), same shape ``(..., 1)``.
    Multiclass models (``C >= 3``) give ``softmax(logits)`` over the last axis, shape ``(..., C)``.
    Works on backend tensors (inside a ``tf.function`` too) with ``keras.ops``, and on numpy
    arrays with numpy, so that rendering masks never imports Keras (a scene task stays light).
    """
    if isinstance(logits, np.ndarray):
        return _numpy_probabilities(logits)
    from keras import ops

    logits = ops.convert_to_tensor(logits)
    if _channels(logits) == 1:
        return ops.sigmoid(logits)
    return ops.softmax(logits, axis=-1)


def logits_to_labels(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Integer class ids (int32, shape ``(...)``) from logits of shape ``(..., C)``.

    Binary (``C == 1``): class 1 where ``sigmoid(logit) >= threshold``, evaluated as
    ``logit >= log(threshold / (1 - threshold))`` so saturated sigmoids do not blur the edge; a
    logit of exactly 0 is class 1 at the default threshold 0.5. ``threshold`` 0 makes every pixel
    class 1, 1 makes none. Multiclass: ``argmax`` over the last axis (``threshold`` unused).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
    if isinstance(logits, np.ndarray):  # the same rule in numpy: no Keras import
        if _channels(logits) == 1:
            return (logits[..., 0] >= _logit(threshold)).astype(np.int32)
        return np.argmax(logits, axis=-1).astype(np.int32)
    from keras import ops

    logits = ops.convert_to_tensor(logits)
    if _channels(logits) == 1:
        positive = ops.greater_equal(logits[..., 0], _logit(threshold))
        return ops.cast(positive, "int32")
    return ops.cast(ops.argmax(logits, axis=-1), "int32")


def _numpy_probabilities(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    if _channels(x) == 1:  # sigmoid without overflow: exp of a non-positive number only
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _channels(logits: Tensor) -> int:
    channels = logits.shape[-1] if len(logits.shape) else None
    if channels is None:
        raise ValueError(f"logits need a static channel axis last; got shape {logits.shape}")
    return int(channels)


# ---- the confusion matrix: one pair-index formula, counted by keras.ops or numpy ---------------


def _pair_index(
    t: Tensor, p: Tensor, num_classes: int, ignore_index: int | None, xp: Any
) -> Tensor:
    """``t * n + p`` per pixel; pixels with a label outside ``[0, n)`` or an ignored truth go to
    the spare bin ``n * n``. ``xp`` is ``numpy`` or ``keras.ops`` (same function names)."""
    n = num_classes
    valid = xp.logical_and(
        xp.logical_and(xp.greater_equal(t, 0), xp.less(t, n)),
        xp.logical_and(xp.greater_equal(p, 0), xp.less(p, n)),
    )
    if ignore_index is not None:
        valid = xp.logical_and(valid, xp.not_equal(t, ignore_index))
    return xp.where(valid, t * n + p, n * n)


def confusion_matrix(
    y_true: Tensor, y_pred: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Confusion counts ``(num_classes, num_classes)`` int32 with ``keras.ops``; rows = truth.

    ``y_true`` and ``y_pred`` are integer class ids of any shape with the same number of elements
    (e.g. ``(B, H, W)`` and ``(B, H, W, 1)``). Pixels whose truth or prediction lies outside
    ``[0, num_classes)``, or whose truth equals ``ignore_index``, are not counted. Traceable
    (fixed output shape), so it runs inside a ``tf.function`` step and can be summed across
    replicas; on numpy input it returns a backend tensor (``keras.ops.convert_to_numpy`` it).
    int32 counts hold one batch; accumulate across steps with `ConfusionMatrix.add` (int64).
    """
    from keras import ops

    n = _check_num_classes(num_classes)
    t = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    p = ops.reshape(ops.cast(y_pred, "int32"), (-1,))
    index = _pair_index(t, p, n, ignore_index, ops)
    # segment_sum is a bincount with a static length: jit/tf.function friendly on every backend.
    counts = ops.segment_sum(ops.ones_like(index), index, num_segments=n * n + 1)
    return ops.reshape(counts[: n * n], (n, n))


def _confusion_matrix_numpy(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    n = num_classes
    t = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    p = np.asarray(y_pred).astype(np.int64, copy=False).reshape(-1)
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} elements but y_pred has {p.size}")
    index = _pair_index(t, p, n, ignore_index, np)
    return np.bincount(index, minlength=n * n + 1)[: n * n].reshape(n, n)


def _check_num_classes(num_classes: int) -> int:
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    return int(num_classes)


# ---- scores from a confusion matrix (numpy only) ------------------------------------------------


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator as float64, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _parts(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives, false negatives per class."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square; got shape {cm.shape}")
    tp = np.diag(cm)
    return tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of counted pixels whose prediction equals the truth; NaN if none were counted."""
    cm = np.asarray(cm, dtype=np.int64)
    return float(_ratio(np.trace(cm), cm.sum()))


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU (Jaccard) per class, ``TP / (TP + FP + FN)``; NaN for a class absent from both truth
    and prediction, 0 for a class predicted but absent from the truth."""
    tp, fp, fn = _parts(cm)
    return _ratio(tp, tp + fp + fn)


def mean_iou(cm: np.ndarray) -> float:
    """Mean of `iou_per_class` over the classes where it is defined (present in truth or
    prediction); NaN when no class is."""
    return _nanmean(iou_per_class(cm))


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """Dice (= F1) per class, ``2 TP / (2 TP + FP + FN)``; NaN/0 as for `iou_per_class`."""
    tp, fp, fn = _parts(cm)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def mean_dice(cm: np.ndarray) -> float:
    """Mean of `dice_per_class` over the classes where it is defined; NaN when none is."""
    return _nanmean(dice_per_class(cm))


def precision_per_class(cm: np.ndarray) -> np.ndarray:
    """``TP / (TP + FP)`` per class; NaN for a class never predicted."""
    tp, fp, _ = _parts(cm)
    return _ratio(tp, tp + fp)


def recall_per_class(cm: np.ndarray) -> np.ndarray:
    """``TP / (TP + FN)`` per class; NaN for a class absent from the truth."""
    tp, _, fn = _parts(cm)
    return _ratio(tp, tp + fn)


def _json_list(values: np.ndarray) -> list[float | None]:
    """Floats for JSON: NaN becomes None (JSON has no NaN)."""
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMatrix:
    """A streaming confusion matrix (int64 numpy counts, rows = truth) and the scores from it.

    Feed it labels with `update`, in-step matrices from `confusion_matrix` with `add`, or other
    accumulators (e.g. one per Ray worker) with `merge`. Absent classes follow the module rules.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
    ) -> None:
        self.num_classes = _check_num_classes(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names for {self.num_classes} classes"
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> ConfusionMatrix:
        """Count a batch of integer labels (any shapes with equal sizes); returns self."""
        self.matrix += _confusion_matrix_numpy(y_true, y_pred, self.num_classes, self.ignore_index)
        return self

    def add(self, counts: Tensor) -> ConfusionMatrix:
        """Add a ``(n, n)`` count matrix, e.g. the output of `confusion_matrix`; returns self."""
        counts = np.asarray(counts)
        if counts.shape != self.matrix.shape:
            raise ValueError(f"expected counts of shape {self.matrix.shape}; got {counts.shape}")
        self.matrix += counts.astype(np.int64)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge {other.num_classes} classes into {self.num_classes} classes"
            )
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        """Set every count back to zero."""
        self.matrix[...] = 0

    @property
    def pixel_accuracy(self) -> float:
        """See `pixel_accuracy`."""
        return pixel_accuracy(self.matrix)

    @property
    def iou(self) -> np.ndarray:
        """Per-class IoU, see `iou_per_class`."""
        return iou_per_class(self.matrix)

    @property
    def mean_iou(self) -> float:
        """See `mean_iou`."""
        return mean_iou(self.matrix)

    @property
    def dice(self) -> np.ndarray:
        """Per-class Dice (= F1), see `dice_per_class`."""
        return dice_per_class(self.matrix)

    @property
    def mean_dice(self) -> float:
        """See `mean_dice`."""
        return mean_dice(self.matrix)

    @property
    def precision(self) -> np.ndarray:
        """Per-class precision, see `precision_per_class`."""
        return precision_per_class(self.matrix)

    @property
    def recall(self) -> np.ndarray:
        """Per-class recall, see `recall_per_class`."""
        return recall_per_class(self.matrix)

    def names(self, class_names: Sequence[str] | None = None) -> list[str]:
        """The class names given here or at construction, else ``class_0 … class_{n-1}``."""
        names = class_names if class_names is not None else self.class_names
        if names is None:
            return [f"class_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names for {self.num_classes} classes")
        return [str(name) for name in names]

    def summary(self) -> dict[str, Any]:
        """JSON-ready scores: plain floats and lists, undefined values (NaN) as ``None``."""
        return {
            "num_classes": self.num_classes,
            "class_names": self.names(),
            "pixels": int(self.matrix.sum()),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "mean_iou": _json_float(self.mean_iou),
            "mean_dice": _json_float(self.mean_dice),
            "iou": _json_list(self.iou),
            "dice": _json_list(self.dice),
            "precision": _json_list(self.precision),
            "recall": _json_list(self.recall),
            "support": [int(v) for v in self.matrix.sum(axis=1)],
            "confusion_matrix": self.matrix.tolist(),
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """A fixed-width text table: one row per class, then the means and pixel accuracy."""
        names = self.names(class_names)
        width = max(8, *(len(name) for name in names))
        columns = ("IoU", "Dice", "Precision", "Recall", "Pixels")
        lines = [f"{'class':<{width}}" + "".join(f"{c:>11}" for c in columns)]
        support = self.matrix.sum(axis=1)
        scores = np.stack([self.iou, self.dice, self.precision, self.recall], axis=1)
        for name, row, pixels in zip(names, scores, support, strict=True):
            cells = "".join(f"{s:>11.4f}" if not math.isnan(s) else f"{'-':>11}" for s in row)
            lines.append(f"{name:<{width}}{cells}{pixels:>11d}")
        lines.append(f"{'mean':<{width}}{self.mean_iou:>11.4f}{self.mean_dice:>11.4f}")
        lines.append(f"pixel accuracy {self.pixel_accuracy:.4f} over {self.matrix.sum()} pixels")
        return "\n".join(lines)


# ---- the pixel IoU of the Kaggle nuclei (DSB 2018) tutorials -----------------------------------


def mean_iou_thresholds(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    thresholds: Sequence[float] = tuple(np.arange(0.5, 1.0, 0.05)),
    include_background: bool = False,
) -> float:
    """Pixel IoU of a binary mask averaged over probability thresholds (numpy).

    For each threshold ``t`` the prediction is ``probabilities >= t`` (the `logits_to_labels`
    rule) and its foreground IoU against ``y_true > 0`` is taken over all pixels given (pooled,
    not per image); the result is the mean over thresholds, skipping thresholds where the IoU is
    undefined (no foreground in truth nor prediction; NaN if that holds at every threshold).
    ``probabilities`` is P(foreground) shaped like ``y_true`` or with a trailing axis of 1.

    This is the pixel metric of the Keras U-Net tutorials for the Data Science Bowl 2018, not the
    competition's score (object-level precision at IoU thresholds). Those tutorials used
    ``tf.metrics.mean_iou`` on 2 classes, i.e. the mean of background and foreground IoU, with
    ``prob > t``: pass ``include_background=True`` for the two-class mean.
    """
    truth = (np.asarray(y_true) > 0).reshape(-1)
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if truth.size != probs.size:
        raise ValueError(f"y_true has {truth.size} pixels but probabilities has {probs.size}")
    scores = []
    for t in thresholds:
        cm = _confusion_matrix_numpy(truth, probs >= t, 2)
        scores.append(mean_iou(cm) if include_background else iou_per_class(cm)[1])
    return _nanmean(np.array(scores))
