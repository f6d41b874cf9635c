"""Losses on hand-made cases and against keras.losses; per-sample shapes; build_loss specs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from segray.train import losses

BIG = 30.0  # |logit| at which sigmoid/softmax probabilities are 0/1 to float32 precision


def _np(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def _binary_logits(mask: np.ndarray) -> np.ndarray:
    """Hard binary logits (B, H, W, 1) predicting exactly ``mask``."""
    return np.where(mask > 0, BIG, -BIG).astype(np.float32)[..., None]


def _random(seed: int, classes: int, shape=(3, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=shape)
    logits = rng.normal(0, 3, size=(*shape, 1 if classes == 2 else classes)).astype(np.float32)
    return labels, logits


def test_perfect_prediction_gives_zero_overlap_losses():
    labels, _ = _random(0, 2)
    binary = _binary_logits(labels)
    multi_labels, _ = _random(1, 4)
    multi = (keras.ops.convert_to_numpy(keras.ops.one_hot(multi_labels, 4)) * 2 - 1) * BIG
    for fn in (losses.soft_dice_loss, losses.soft_jaccard_loss, losses.cross_entropy):
        np.testing.assert_allclose(_np(fn(labels, binary)), 0.0, atol=1e-5)
        np.testing.assert_allclose(_np(fn(multi_labels, multi)), 0.0, atol=1e-5)
    # Absent from the tile and not predicted: ~0 loss thanks to the default smooth of 1.
    empty = np.zeros((1, 8, 8), np.int64)
    np.testing.assert_allclose(
        _np(losses.soft_dice_loss(empty, _binary_logits(empty))), 0, atol=1e-5
    )


def test_half_overlap_by_hand():
    truth = np.zeros((1, 4, 4), np.int64)
    pred = np.zeros((1, 4, 4), np.int64)
    truth[0, 0, :4] = 1  # 4 px
    pred[0, 0, 2:4] = 1
    pred[0, 1, 0:2] = 1  # 4 px, 2 of them on the truth
    logits = _binary_logits(pred)
    # Hard probabilities: dice = 2*2 / (4+4) = 0.5 -> loss 0.5; IoU = 2 / (4+4-2) = 1/3 -> 2/3.
    dice = losses.soft_dice_loss(truth, logits, smooth=1e-6)
    jaccard = losses.soft_jaccard_loss(truth, logits, smooth=1e-6)
    np.testing.assert_allclose(_np(dice), [0.5], atol=1e-5)
    np.testing.assert_allclose(_np(jaccard), [2 / 3], atol=1e-5)
    # Default smooth s = 1: dice = (4 + 1) / (8 + 1) = 5/9 -> loss 4/9.
    np.testing.assert_allclose(_np(losses.soft_dice_loss(truth, logits)), [4 / 9], atol=1e-5)

    # Three classes on 4 px, truth [0,0,1,2], prediction [0,1,1,1]: dice per class
    # c0: 2*1/(2+1) = 2/3, c1: 2*1/(1+3) = 1/2, c2: 0/(1+0) = 0 -> mean 7/18, loss 11/18.
    # Weights (1, 1, 4): (2/3 + 1/2 + 0) / 6 = 7/36 -> loss 29/36.
    t3 = np.array([[[0, 0, 1, 2]]])
    l3 = keras.ops.convert_to_numpy(keras.ops.one_hot(np.array([[[0, 1, 1, 1]]]), 3)) * 2 - 1
    l3 = l3 * BIG
    got = losses.soft_dice_loss(t3, l3, smooth=1e-6)
    np.testing.assert_allclose(_np(got), [11 / 18], atol=1e-5)
    got_w = losses.soft_dice_loss(t3, l3, class_weights=[1, 1, 4], smooth=1e-6)
    np.testing.assert_allclose(_np(got_w), [29 / 36], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropies_equal_keras(seed):
    labels, logits = _random(seed, 2)
    ref = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)(
        labels[..., None], logits
    )
    np.testing.assert_allclose(
        _np(losses.binary_cross_entropy(labels, logits)), _np(ref).mean(axis=(1, 2)), rtol=1e-5
    )
    # 'ce' on a binary problem is BCE; (B, H, W, 1) labels are accepted.
    np.testing.assert_allclose(
        _np(losses.build_loss("ce", 2)(labels[..., None], logits)),
        _np(ref).mean(axis=(1, 2)),
        rtol=1e-5,
    )

    labels, logits = _random(seed, 5)
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    np.testing.assert_allclose(
        _np(losses.sparse_categorical_cross_entropy(labels, logits)),
        _np(scce(labels, logits)).mean(axis=(1, 2)),
        rtol=1e-5,
    )


def test_class_weights_scale_each_pixel_by_its_true_class():
    labels, logits = _random(3, 4)
    weights = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    expected = _np(scce(labels, logits, sample_weight=weights[labels])).mean(axis=(1, 2))
    got = losses.sparse_categorical_cross_entropy(labels, logits, class_weights=weights)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-5)
    plain = _np(losses.sparse_categorical_cross_entropy(labels, logits))
    doubled = losses.sparse_categorical_cross_entropy(labels, logits, class_weights=[2.0] * 4)
    np.testing.assert_allclose(_np(doubled), 2 * plain, rtol=1e-5)

    labels, logits = _random(4, 2)
    only_fg = _np(losses.binary_cross_entropy(labels, logits, class_weights=[0.0, 1.0]))
    pixel = _np(
        keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)(labels[..., None], logits)
    )
    np.testing.assert_allclose(only_fg, (pixel * labels).mean(axis=(1, 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        losses.build_loss("ce", 3, class_weights=[1, 2])


def test_focal_equals_keras():
    labels, logits = _random(5, 2)
    ref = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.3, gamma=1.5, from_logits=True, reduction=None
    )(labels[..., None], logits)
    got = losses.focal_loss(labels, logits, gamma=1.5, alpha=0.3)
    np.testing.assert_allclose(_np(got), _np(ref).mean(axis=(1, 2)), rtol=1e-4)

    labels, logits = _random(6, 3)
    onehot = keras.ops.one_hot(labels, 3)
    ref = keras.losses.CategoricalFocalCrossentropy(
        alpha=0.25, gamma=2.0, from_logits=True, reduction=None
    )(onehot, logits)
    got = losses.focal_loss(labels, logits)
    np.testing.assert_allclose(_np(got), _np(ref).mean(axis=(1, 2)), rtol=1e-4)
    # gamma 0, alpha 1 is plain cross-entropy.
    np.testing.assert_allclose(
        _np(losses.focal_loss(labels, logits, gamma=0.0, alpha=1.0)),
        _np(losses.cross_entropy(labels, logits)),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [(name, n) for name in losses.LOSSES for n in (2, 4) if not (name == "bce" and n != 2)],
)
def test_every_loss_is_per_sample(name, num_classes):
    labels, logits = _random(7, num_classes, shape=(5, 6, 7))
    value = losses.build_loss(name, num_classes, class_weights=[1.0] * num_classes)(labels, logits)
    assert tuple(value.shape) == (5,)
    assert np.all(np.isfinite(_np(value))) and np.all(_np(value) >= 0)


def test_weighted_sum_equals_its_parts():
    labels, logits = _random(8, 3)
    combo = losses.build_loss("0.7*ce+0.3*dice", 3)
    assert combo.name == "0.7*ce+0.3*dice"
    parts = 0.7 * _np(losses.build_loss("ce", 3)(labels, logits)) + 0.3 * _np(
        losses.build_loss("dice", 3)(labels, logits)
    )
    np.testing.assert_allclose(_np(combo(labels, logits)), parts, rtol=1e-6)
    for same in ({"ce": 0.7, "dice": 0.3}, ["0.7*ce", "0.3 * dice"], " 0.7*CE + 0.3*dice "):
        np.testing.assert_allclose(
            _np(losses.build_loss(same, 3)(labels, logits)), parts, rtol=1e-6
        )
    assert losses.build_loss("ce+dice", 3).name == "ce+dice"


def test_bad_specs_say_what_is_allowed():
    with pytest.raises(ValueError, match="allowed: ce, bce, dice, jaccard, focal"):
        losses.build_loss("0.5*ce+0.5*lovasz", 3)
    with pytest.raises(ValueError, match="bad loss term"):
        losses.build_loss("x*ce", 3)
    with pytest.raises(ValueError, match="num_classes == 2"):
        losses.build_loss("bce", 3)
    with pytest.raises(ValueError, match="gamma"):
        losses.build_loss("focal", 3, options={"focal": {"beta": 1.0}})
    with pytest.raises(ValueError, match="logit channel"):
        losses.build_loss("ce", 3)(*_random(0, 2))
    assert losses.list_losses() == list(losses.LOSSES)
    focal = losses.build_loss("focal", 2, options={"focal": {"gamma": 0.0, "alpha": 0.5}})
    labels, logits = _random(9, 2)
    np.testing.assert_allclose(
        _np(focal(labels, logits)),
        0.5 * _np(losses.binary_cross_entropy(labels, logits)),
        rtol=1e-5,
    )


def test_loss_traces_in_tf_function_with_finite_gradients():
    import tensorflow as tf

    labels, logits = _random(10, 4)
    loss = losses.build_loss("ce+dice+0.5*focal+jaccard", 4, class_weights=[1, 2, 3, 4])
    variable = tf.Variable(logits)

    @tf.function
    def step(y):
        with tf.GradientTape() as tape:
            per_sample = loss(y, variable)
            total = tf.nn.compute_average_loss(per_sample, global_batch_size=6)
        return per_sample, tape.gradient(total, variable)

    per_sample, grad = step(tf.constant(labels))
    np.testing.assert_allclose(per_sample.numpy(), _np(loss(labels, logits)), rtol=1e-5)
    assert np.all(np.isfinite(grad.numpy())) and np.abs(grad.numpy()).sum() > 0
