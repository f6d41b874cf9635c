"""``segray bench startup`` runs each side as a whole process and reports their first masks."""

from __future__ import annotations

import pytest

from segray.devtools.bench.startup import bench_startup, format_report, side_names


@pytest.mark.slow
def test_startup_bench_times_every_side_and_checks_their_masks():
    lines: list[str] = []
    result = bench_startup(tiles=12, size=32, repeats=1, echo=lines.append)
    sides = result["sides"]
    names = side_names(("keras", "onnx"))
    assert set(sides) == set(names) and "pool, onnx" in names
    for side, figures in sides.items():
        assert 0 < figures["first_s"] <= figures["end_s"], (side, figures)
        assert len(figures["runs"]) == 1
    table = format_report(result)
    assert table in lines
    for side in names:
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {side} |")]
        first = sides[side]["first_s"] / sides["plain loop"]["first_s"]
        assert f"{first:.2f}×" in row
