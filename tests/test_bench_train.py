"""``segray bench train``'s figures: medians of each side's rates and of the rounds' ratios."""

from __future__ import annotations

import numpy as np
import pytest

from segray.devtools.bench import train as bench


def test_ratios_are_medians_of_the_rounds_ratios_not_ratios_of_medians():
    rates = {
        "bare": [100.0, 50.0, 80.0],
        "ray1_streamed": [70.0, 40.0, 60.0],
        "ray1": [90.0, 48.0, 60.0],
        "ray2": [90.0, 24.0, 60.0],
    }
    lines: list[str] = []
    figures = bench._summary(rates, lines.append)
    assert figures["ray1_over_bare"] == pytest.approx(0.9)  # rounds 0.9, 0.96, 0.75
    assert figures["bare_img_s"] == 80.0 and figures["ray1_img_s"] == 60.0
    assert figures["ray2_over_ray1"] == pytest.approx(1.0)  # rounds 1.0, 0.5, 1.0
    assert figures["overhead"] == pytest.approx(0.1)
    assert figures["rounds"]["ray1"] == [90.0, 48.0, 60.0]
    assert "Ray 1 worker / bare Keras = 0.90 (rounds: 0.90, 0.96, 0.75)" in "\n".join(lines)


def test_only_the_ratios_of_the_sides_that_ran_are_given():
    figures = bench._summary({"bare": [50.0, 40.0], "ray1": [45.0, 40.0]}, lambda line: None)
    assert figures["ray1_over_bare"] == pytest.approx(0.95)
    assert "ray2_over_ray1" not in figures and "ray1_streamed_over_bare" not in figures


def test_too_few_epochs_or_rounds_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="epochs >= 2"):
        bench.bench_train(epochs=1, echo=lambda line: None)
    with pytest.raises(ValueError, match="rounds >= 1"):
        bench.bench_train(rounds=0, echo=lambda line: None)
    with pytest.raises(ValueError, match=r"unknown bench train side\(s\) \['ray3'\]"):
        bench.bench_train(sides=("ray1", "ray3"), echo=lambda line: None)


def test_the_step_alone_trains_the_benchs_tiles_without_ray(tmp_path):
    from segray.devtools import synth

    synth.write_collection(str(tmp_path), count=10, size=32, mode="binary", seed=1)
    x, y = bench._tiles(str(tmp_path), 32)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and x.shape[:3] == y.shape
    rate = bench._step(str(tmp_path), 32, {"base_filters": 4, "depth": 2}, 4, 2)
    assert np.isfinite(rate) and rate > 0
