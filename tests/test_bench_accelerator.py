"""The accelerator bench runs as the lent GPU machine would run it: Keras on JAX, TensorFlow and
Ray unimportable, a saved segray model, one call, a JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parent.parent

#: Run the bench in a process where ``import tensorflow`` and ``import ray`` fail, as on the device.
NO_TF_NO_RAY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "ray"):
            raise ImportError(name + " is not installed on the accelerator machine")
from segray.devtools.bench import accelerator
sys.meta_path.insert(0, Block())
sys.exit(accelerator.main(sys.argv[1:]))
"""


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", NO_TF_NO_RAY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from segray.models import build_model

    keras.utils.set_random_seed(3)
    model = build_model("unet", 3, (32, 32, 3), base_filters=4)
    path = tmp_path_factory.mktemp("acc") / "model.keras"
    model.save(path)
    return path


def test_saved_model_bench_without_tensorflow_or_ray(saved_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ("--model", str(saved_model.parent), "--precisions", "bf16,fp32")
    done = _bench(*args, "--windows", "8", "--batch", "4", "--repeats", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "jax"
    assert report["input_shape"] == [32, 32, 3]
    assert not {"tensorflow", "ray"} & set(report["imported"])
    rows = {r["precision"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "bf16"]  # fp32 first: it is every ratio's anchor
    assert rows["fp32"]["x_fp32"] == 1.0 and rows["fp32"]["pixels_changed"] == 0.0
    for r in rows.values():
        assert r["windows_per_s"] > 0
    ratio = rows["bf16"]["windows_per_s"] / rows["fp32"]["windows_per_s"]
    assert rows["bf16"]["x_fp32"] == pytest.approx(ratio)
    assert rows["bf16"]["pixels_changed"] < 0.05  # same weights, lower precision: few flips
    assert "bf16" in done.stdout and "windows/s" in done.stdout


def test_missing_model_is_named(tmp_path: Path) -> None:
    done = _bench("--model", str(tmp_path / "nowhere"), "--windows", "1")
    assert done.returncode != 0
    assert str(tmp_path / "nowhere") in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_precision_is_named() -> None:
    done = _bench("--precisions", "fp32,int8", "--windows", "1")
    assert done.returncode == 2
    assert "--precisions" in done.stderr and "int8" in done.stderr
