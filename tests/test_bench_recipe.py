"""``segray bench recipe``: its weights, its held-out blocks on the real crop, its table, and a
quick run through plain Keras and segray's default on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest

from segray.devtools.bench import recipe
from segray.train import losses
from segray.train.config import TrainConfig


def test_frequency_weights_make_each_class_weigh_the_same_and_keep_the_mean_at_one():
    counts = [980, 20]
    share = np.array(counts) / sum(counts)
    inverse = np.array(losses.frequency_weights(counts, 1.0))
    assert inverse[1] / inverse[0] == pytest.approx(49.0, rel=1e-4)
    assert np.sum(share * inverse) == pytest.approx(1.0, rel=1e-5)
    assert share[0] * inverse[0] == pytest.approx(share[1] * inverse[1], rel=1e-4)
    root = np.array(losses.frequency_weights(counts, 0.5))
    assert root[1] / root[0] == pytest.approx(7.0, rel=1e-4)
    assert np.sum(share * root) == pytest.approx(1.0, rel=1e-5)
    assert losses.frequency_weights(counts, 0.0) == (1.0, 1.0)
    absent = losses.frequency_weights([50, 0, 50], 1.0)
    assert absent == (1.0, 1.0, 1.0)  # the missing class weighs as much as the heaviest other
    for bad in ([5], [0, 0], [3, -1]):
        with pytest.raises(ValueError, match="class_pixels"):
            losses.frequency_weights(bad)


def test_held_out_blocks_are_fixed_whole_blocks_and_hold_both_targets(tmp_path):
    tiles = [(r, c) for r in range(0, 443 - 31, 32) for c in range(0, 489 - 31, 32)]
    held = {t for t in tiles if recipe.held_out(*t)}
    assert 0.15 < len(held) / len(tiles) < 0.35
    for r, c in held:  # a held-out tile's whole 3 x 3 block is held out
        top, left = r - r % 96, c - c % 96
        block = [(top + i * 32, left + j * 32) for i in range(3) for j in range(3)]
        assert all(t in held for t in block if t in tiles)
    train_dir, test_dir = recipe.cut_tiles(tmp_path / "water", recipe.TARGETS["water"])
    train, test = recipe.load_rows(train_dir), recipe.load_rows(test_dir)
    assert (len(train), len(test)) == (len(tiles) - len(held), len(held))
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    for rows in (train, test):
        counts = recipe.class_pixels(rows)
        assert 0.003 < counts[1] / sum(counts) < 0.05  # water is rare on both sides
    corner = next(r for r in train if r["id"].endswith("r0000_c0000"))
    assert not corner["valid"].all() and np.all(corner["mask"][~corner["valid"]] == 255)


def test_table_gives_medians_and_ratios_to_the_anchor():
    results = {
        "water": {
            recipe.ANCHOR: [(0.2, 0.3), (0.1, 0.2), (0.3, 0.4)],
            recipe.OLD_DEFAULT: [(0.1, 0.2), (0.1, 0.2), (0.2, 0.3)],
            recipe.DEFAULT: [(0.4, 0.5), (0.5, 0.6), (0.3, 0.4)],
        }
    }
    lines = recipe.table(results, 3)
    row = next(line for line in lines if recipe.DEFAULT in line and line.startswith("water"))
    assert row.split()[-6:-3] == ["0.400", "0.500", "2.00"]
    old = next(line for line in lines if recipe.OLD_DEFAULT in line)
    assert "0.100" in old and "0.50" in old
    assert any("0.100 -> 0.400 (x4.00)" in line for line in lines)
    zero = {"water": {recipe.ANCHOR: [(0.0, 0.0)], recipe.DEFAULT: [(0.2, 0.3)]}}
    assert "n/a" in recipe.table(zero, 1)[2]


@pytest.mark.slow
def test_quick_bench_scores_the_anchor_and_the_default_on_held_out_water(ray_local):
    figures = recipe.bench_recipe(**recipe.QUICK)
    runs = figures["results"]["water"]
    assert set(runs) == {recipe.ANCHOR, recipe.DEFAULT}
    for scores in runs.values():
        assert len(scores) == 1
        iou, f1 = scores[0]
        assert 0.0 <= iou <= f1 <= 1.0  # F1 = 2 IoU / (1 + IoU) >= IoU
        assert f1 == pytest.approx(2 * iou / (1 + iou), abs=1e-9)
    assert any(line.startswith("water") and recipe.DEFAULT in line for line in figures["table"])
    assert any(line.startswith("water") and recipe.ANCHOR in line for line in figures["table"])
    saved = figures["defaults"]["water"]  # what the run's config.yaml says it trained with
    assert saved["loss"] == TrainConfig.model_fields["loss"].default
    balance = TrainConfig.model_fields["class_balance"].default
    expected = losses.frequency_weights(figures["class_pixels"]["water"], balance)
    assert tuple(saved["class_weights"]) == expected


@pytest.mark.slow
def test_two_class_runs_weigh_classes_by_their_training_pixels(tmp_path, ray_local):
    """The default the bench chose: no class_weights given, two classes → weights from the
    training split's pixels (not the validation tiles'), recorded in the run's config."""
    from segray.datasets import labels
    from segray.train.driver import prepare

    train_dir, _ = recipe.cut_tiles(tmp_path / "water", recipe.TARGETS["water"])
    base = dict(data=train_dir, num_classes=2, size=32, batch_size=4, workers=2, val_fraction=0.3)
    spec = labels.DatasetSpec(root=train_dir, num_classes=2, size=32)
    train_s, val_s = labels.split_samples(labels.find_samples(spec), 0.3, 0)
    counts = recipe.class_pixels([labels.load_sample(s, spec) for s in train_s])
    balance = TrainConfig.model_fields["class_balance"].default
    every = recipe.class_pixels([labels.load_sample(s, spec) for s in [*train_s, *val_s]])
    assert counts != every
    plan = prepare(TrainConfig(out=str(tmp_path / "a"), **base))
    weights = plan.config.class_weights
    assert weights == losses.frequency_weights(counts, balance)
    assert weights != losses.frequency_weights(every, balance)
    assert weights[1] / weights[0] > 5  # water, ~1.5 % of the pixels, weighs more
    fixed = prepare(TrainConfig(out=str(tmp_path / "b"), class_weights=(1, 3), **base))
    assert fixed.config.class_weights == (1, 3)
    off = prepare(TrainConfig(out=str(tmp_path / "c"), class_balance=0, **base))
    assert off.config.class_weights is None
