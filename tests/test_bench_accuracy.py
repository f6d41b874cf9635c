"""``segray bench accuracy``: the real datasets' held-out blocks, the table, the overrides and
refusals; the sides themselves run as benchmarks, not tests."""

from __future__ import annotations

import pytest
import rasterio

from segray.devtools.bench import accuracy


@pytest.mark.parametrize("name", list(accuracy.DATASETS))
def test_each_dataset_cuts_into_fixed_blocks_with_the_target_on_both_sides(name, tmp_path):
    data = accuracy.DATASETS[name]
    with rasterio.open(accuracy.DATA / data.labels) as ds:
        h, w = ds.height, ds.width
    t = data.tile
    tiles = [(r, c) for r in range(0, h - t + 1, t) for c in range(0, w - t + 1, t)]
    held = {x for x in tiles if accuracy.held_out(*x, t)}
    assert 0.15 < len(held) / len(tiles) < 0.35
    span = t * accuracy.BLOCK
    for r, c in held:  # a held-out tile's whole block is held out
        block = [(r - r % span + i * t, c - c % span + j * t) for i in range(3) for j in range(3)]
        assert all(x in held for x in block if x in tiles)
    train_dir, test_dir = accuracy.cut_tiles(tmp_path, data)
    train, test = accuracy.load_rows(train_dir, t), accuracy.load_rows(test_dir, t)
    assert (len(train), len(test)) == (len(tiles) - len(held), len(held))
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    for rows in (train, test):
        assert 0.005 < accuracy.target_share(rows) < 0.7
        assert rows[0]["image"].shape[:2] == (t, t)


def test_table_gives_medians_spread_ratio_and_flags_collapsed_seeds():
    results = {
        "vegas-roads": {
            "keras": [(0.2, 0.3), (0.1, 0.2), (0.3, 0.4)],
            "segray-2w": [(0.4, 0.5), (0.1, 0.2), (0.44, 0.6)],
        }
    }
    lines = accuracy.table(results)
    row = next(line for line in lines if "segray-2w" in line)
    assert "0.400" in row and "0.500" in row and "0.100-0.440" in row
    assert " 2.00 " in row  # 0.4 / 0.2
    assert "0.100!" in row and "0.400!" not in row  # 0.1 < 0.7 x 0.4
    anchor = next(line for line in lines if line.split()[:2] == ["vegas-roads", "keras"])
    assert "0.100!" in anchor and " 1.00 " in anchor
    s = accuracy.summary(results["vegas-roads"]["segray-2w"])
    assert s["collapsed"] == [1] and s["iou"] == pytest.approx(0.4)


def test_overrides_are_checked_and_unknown_names_refused():
    assert accuracy.parse_sets(["monitor=val_miou", "class-balance=0", "augment={}"]) == {
        "monitor": "val_miou",
        "class_balance": 0,
        "augment": {},
    }
    with pytest.raises(ValueError, match="--set 'lr=3': give KEY=VALUE with KEY a training"):
        accuracy.parse_sets(["lr=3"])
    with pytest.raises(ValueError, match="unknown datasets or sides \\['mars'\\]"):
        accuracy.bench_accuracy(["mars"])
    with pytest.raises(ValueError, match="unknown datasets or sides \\['segray-3w'\\]"):
        accuracy.bench_accuracy(sides=["segray-3w"])


def test_cli_refuses_an_unknown_setting_as_a_usage_error():
    from click.testing import CliRunner

    from segray.cli import cli

    result = CliRunner().invoke(cli, ["bench", "accuracy", "--set", "nope=1"])
    assert result.exit_code == 2 and "--set 'nope=1'" in result.output


def test_table_gives_the_augmented_rows_and_their_cost():
    results = {
        "nc-water": {
            "keras": [(0.2, 0.3), (0.3, 0.4)],
            "keras seconds": [(1.0, 0.0), (2.0, 0.0)],
            "keras+d4": [(0.25, 0.35), (0.35, 0.45)],
            "keras seconds+d4": [(8.0, 0.0), (14.0, 0.0)],
        }
    }
    lines = accuracy.table(results)
    assert not any("seconds" in line.split()[1] for line in lines if line.startswith("nc-water "))
    row = next(line for line in lines if line.split()[:2] == ["nc-water", "keras+d4"])
    assert "0.300" in row and " 1.20 " in row  # 0.30 / 0.25
    assert "nc-water keras: scoring with --tta d4 takes 7.5x" in lines  # median of 8 and 7


def test_tune_bench_table_gives_the_ratio_to_the_default_and_what_asha_saved():
    from segray.devtools.bench import search

    def row(side, iou, epochs, seconds):
        keys = ("dataset", "side", "iou", "f1", "trials", "epochs", "seconds")
        return dict(zip(keys, ("nc-water", side, iou, iou, 16, epochs, seconds), strict=True))

    rows = [row("default", 0.2, 30, 60), row("asha", 0.3, 120, 400), row("to-end", 0.32, 480, 1600)]
    lines = search.table(rows)
    asha = next(line for line in lines if line.startswith("nc-water     asha"))
    assert asha.split()[4] == "1.50" and asha.split()[6] == "120"
    assert lines[-1] == (
        "nc-water: ASHA trained 25% of the epochs and took 25% of the seconds of the same trials "
        "run to the end, IoU 0.300 against 0.320"
    )
    with pytest.raises(ValueError, match="sides any of default, asha, to-end"):
        search.bench_tune(sides=("asha", "fifo"))
    assert set(search.SPACE) <= set(search.train_config("d", "o", 32, 0, 1, 4, 1).to_dict())
