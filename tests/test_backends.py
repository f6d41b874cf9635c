"""A `.keras` file saved under TensorFlow loads under JAX (safe_mode=True) with the same outputs.

This is the proof that model code uses keras.layers / keras.ops only: the JAX side runs in a
subprocess with KERAS_BACKEND=jax, so no TensorFlow op can hide in a layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segray import models

pytest.importorskip("jax")

TINY = {
    "unet": {"base_filters": 4, "depth": 2, "upsampling": "bilinear", "batch_norm": True},
    "fcn8s": {"base_filters": 4, "fc_filters": 8},
    "segnet": {"base_filters": 4, "depth": 2},
    "bayesian-segnet": {"base_filters": 4, "depth": 2, "dropout_units": 2},
    "deeplabv3plus": {
        "backbone_filters": 4,
        "aspp_filters": 8,
        "low_level_filters": 8,
        "decoder_filters": 8,
    },
}

JAX_SIDE = """
import json, sys
import numpy as np
import keras
from segray import models
assert keras.backend.backend() == "jax"
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = models.load_keras(path)
    models.set_monte_carlo(model, False)
    x = np.load(sys.argv[2])
    out[name] = np.asarray(model(x, training=False)).tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tensorflow_saved_models_load_and_agree_under_jax(tmp_path):
    x = np.random.default_rng(0).random((2, 64, 64, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    paths, expected = {}, {}
    for name, options in TINY.items():
        model = models.build_model(name, 3, (64, 64, 4), **options)
        models.set_monte_carlo(model, False)
        paths[name] = str(tmp_path / f"{name}.keras")
        model.save(paths[name])
        expected[name] = np.asarray(model(x, training=False))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", JAX_SIDE, json.dumps(paths), str(tmp_path / "x.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in TINY:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], atol=1e-4, err_msg=name)
