"""Metrics against scikit-learn, streaming against one-shot, keras.ops against numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, jaccard_score

from segray import metrics

N = 5  # classes


def _masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (4, 16, 16) masks: class 2 only predicted, class 3 only in truth, 4 in neither."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 3], size=(4, 16, 16), p=[0.5, 0.3, 0.2])
    y_pred = rng.choice([0, 1, 2], size=(4, 16, 16), p=[0.4, 0.4, 0.2])
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scores_equal_sklearn(seed):
    y_true, y_pred = _masks(seed)
    t, p = y_true.ravel(), y_pred.ravel()
    labels = list(range(N))
    cm = metrics.ConfusionMatrix(N).update(y_true, y_pred)

    np.testing.assert_array_equal(cm.matrix, sk_confusion_matrix(t, p, labels=labels))
    # This scikit-learn's jaccard_score takes zero_division in {0, 1} only (f1_score takes NaN):
    # score 0/0 as 0 there, then mark the classes absent from both truth and prediction NaN.
    sk_iou = jaccard_score(t, p, labels=labels, average=None, zero_division=0.0)
    sk_iou[~np.isin(labels, np.union1d(t, p))] = np.nan
    sk_f1 = f1_score(t, p, labels=labels, average=None, zero_division=np.nan)
    np.testing.assert_allclose(cm.iou, sk_iou, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(cm.dice, sk_f1, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(cm.pixel_accuracy, np.mean(t == p), atol=1e-6)

    # Absent-class rules: predicted-only and truth-only score 0, absent from both is NaN.
    assert cm.iou[2] == 0 and cm.iou[3] == 0 and math.isnan(cm.iou[4])
    assert cm.dice[2] == 0 and cm.dice[3] == 0 and math.isnan(cm.dice[4])

    # Mean IoU = sklearn's macro average restricted to the classes present in truth or prediction.
    present = np.union1d(t, p)
    sk_macro_iou = jaccard_score(t, p, labels=present, average="macro")
    sk_macro_f1 = f1_score(t, p, labels=present, average="macro")
    assert cm.mean_iou == pytest.approx(sk_macro_iou, abs=1e-6)
    assert cm.mean_dice == pytest.approx(sk_macro_f1, abs=1e-6)
    assert metrics.mean_iou(cm.matrix) == pytest.approx(np.nanmean(sk_iou), abs=1e-6)


def test_all_absent_gives_nan_and_json_none():
    cm = metrics.ConfusionMatrix(3, class_names=["bg", "building", "road"])
    assert math.isnan(cm.mean_iou) and math.isnan(cm.pixel_accuracy)
    summary = cm.update(np.zeros((2, 2)), np.zeros((2, 2))).summary()
    assert summary["iou"] == [1.0, None, None] and summary["mean_iou"] == 1.0
    json.dumps(summary)  # plain types only
    table = cm.table()
    assert "building" in table and "pixel accuracy 1.0000" in table


def test_streaming_equals_one_shot_and_merge():
    y_true, y_pred = _masks(7)
    whole = metrics.ConfusionMatrix(N).update(y_true, y_pred)
    chunks = metrics.ConfusionMatrix(N)
    for i in range(4):
        chunks.update(y_true[i], y_pred[i, ..., None])  # (H, W) vs (H, W, 1) is fine
    np.testing.assert_array_equal(chunks.matrix, whole.matrix)

    left = metrics.ConfusionMatrix(N).update(y_true[:2], y_pred[:2])
    right = metrics.ConfusionMatrix(N).update(y_true[2:], y_pred[2:])
    np.testing.assert_array_equal(left.merge(right).matrix, whole.matrix)
    assert whole.summary() == chunks.summary()


def test_out_of_range_and_ignore_index_are_not_counted():
    y_true = np.array([0, 1, 2, 255, -1, 1])
    y_pred = np.array([0, 1, 1, 1, 0, 7])
    cm = metrics.ConfusionMatrix(3).update(y_true, y_pred).matrix
    assert cm.sum() == 3 and cm[2, 1] == 1
    ignored = metrics.ConfusionMatrix(3, ignore_index=0).update(y_true, y_pred).matrix
    assert ignored.sum() == 2 and ignored[0].sum() == 0


def test_keras_confusion_matrix_in_tf_function_equals_numpy():
    import keras
    import tensorflow as tf

    y_true, y_pred = _masks(3)
    y_true[0, 0, :3] = [-1, 9, 255]  # out of range: dropped by both paths

    @tf.function
    def step(t, logits):
        counts = metrics.confusion_matrix(t, metrics.logits_to_labels(logits), N)
        assert counts.shape == (N, N)  # static shape, so replicas can sum it
        return counts

    logits = keras.ops.one_hot(y_pred, N) * 5.0
    in_step = step(tf.constant(y_true), logits).numpy()
    numpy_cm = metrics.ConfusionMatrix(N).update(y_true, y_pred).matrix
    np.testing.assert_array_equal(in_step, numpy_cm)
    eager = keras.ops.convert_to_numpy(metrics.confusion_matrix(y_true.astype(np.uint8), y_pred, N))
    # uint8 truth: 255 stays out of range, -1 wraps to 255 as well; counts are the same.
    np.testing.assert_array_equal(eager, numpy_cm)
    assert metrics.ConfusionMatrix(N).add(in_step).mean_iou == pytest.approx(
        metrics.mean_iou(numpy_cm)
    )


def test_logits_to_labels_binary_threshold_edge():
    logits = np.array([[[[-3.0], [0.0]], [[1e-6], [-1e-6]]]], dtype=np.float32)  # (1, 2, 2, 1)
    labels = np.asarray(metrics.logits_to_labels(logits))
    np.testing.assert_array_equal(labels, [[[0, 1], [1, 0]]])  # logit 0 = prob 0.5 -> class 1
    assert labels.dtype == np.int32 and labels.shape == (1, 2, 2)

    edge = np.float32(math.log(0.7 / 0.3))  # exactly at threshold 0.7, and just below it
    below = np.nextafter(edge, np.float32(-np.inf))
    x = np.array([edge, below], dtype=np.float32).reshape(1, 1, 2, 1)
    np.testing.assert_array_equal(np.asarray(metrics.logits_to_labels(x, 0.7)), [[[1, 0]]])
    # A saturated sigmoid (30 -> 1.0 in float32) still compares correctly against 0.9999999.
    big = np.array([30.0, 15.0], dtype=np.float32).reshape(1, 1, 2, 1)
    np.testing.assert_array_equal(np.asarray(metrics.logits_to_labels(big, 0.9999999)), [[[1, 0]]])
    assert np.asarray(metrics.logits_to_labels(big, 0.0)).all()
    assert not np.asarray(metrics.logits_to_labels(big, 1.0)).any()
    with pytest.raises(ValueError, match="threshold"):
        metrics.logits_to_labels(big, 1.5)


def test_logits_to_labels_and_probabilities_multiclass():
    logits = np.array([[[[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]]]], dtype=np.float32)  # (1, 1, 2, 3)
    np.testing.assert_array_equal(np.asarray(metrics.logits_to_labels(logits)), [[[1, 0]]])
    probs = np.asarray(metrics.logits_to_probabilities(logits))
    assert probs.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    binary = np.asarray(metrics.logits_to_probabilities(np.zeros((2, 3, 3, 1), np.float32)))
    assert binary.shape == (2, 3, 3, 1)
    np.testing.assert_allclose(binary, 0.5)


def test_mean_iou_thresholds_by_hand():
    truth = np.array([[1, 1, 0, 0]])
    probs = np.array([[0.93, 0.62, 0.57, 0.1]])  # away from the float thresholds
    # t in {0.50, 0.55}: predicted {0,1,2} -> IoU 2/3; t = 0.60: {0,1} -> 1;
    # t in {0.65 .. 0.90}: {0} -> 1/2; t = 0.95: nothing -> 0.  Ten thresholds 0.50 .. 0.95.
    expected = (2 * (2 / 3) + 1 * 1.0 + 6 * 0.5 + 1 * 0.0) / 10
    assert metrics.mean_iou_thresholds(truth, probs) == pytest.approx(expected)
    assert metrics.mean_iou_thresholds(truth, probs[..., None], thresholds=[0.5]) == pytest.approx(
        2 / 3
    )
    # Two-class mean as in the Keras tutorials: background IoU at t=0.5 is 1/2.
    both = metrics.mean_iou_thresholds(truth, probs, thresholds=[0.5], include_background=True)
    assert both == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(metrics.mean_iou_thresholds(np.zeros(4), np.zeros(4)))


def test_metrics_module_does_not_import_keras_for_numpy_use():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from segray import metrics;"
        "metrics.ConfusionMatrix(2).update(np.zeros(3), np.ones(3)).summary();"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("channels", [1, 4])
def test_numpy_rule_equals_the_keras_rule(channels):
    """Masks rendered from numpy logits (no Keras) follow the rule keras.ops applies to tensors:
    the same labels exactly, probabilities to float rounding; extreme logits neither overflow
    nor give NaN."""
    from keras import ops

    rng = np.random.default_rng(channels)
    logits = (rng.normal(0, 4, (2, 16, 16, channels)) * rng.choice([1, 30], (2, 16, 16, 1))).astype(
        np.float32
    )
    logits[0, 0, 0] = 0.0  # a binary logit exactly at the default threshold
    tensor = ops.convert_to_tensor(logits)
    for threshold in (0.5, 0.7):
        np.testing.assert_array_equal(
            metrics.logits_to_labels(logits, threshold),
            ops.convert_to_numpy(metrics.logits_to_labels(tensor, threshold)),
        )
    mine = metrics.logits_to_probabilities(logits)
    assert isinstance(mine, np.ndarray) and mine.dtype == np.float32 and np.isfinite(mine).all()
    keras_probs = ops.convert_to_numpy(metrics.logits_to_probabilities(tensor))
    np.testing.assert_allclose(mine, keras_probs, atol=1e-6)


def test_rendering_masks_does_not_import_keras():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from segray import metrics;"
        "x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype('float32');"
        "metrics.logits_to_labels(x); metrics.logits_to_probabilities(x[..., :1]);"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
