"""Defaults that fit every model: a scene job and Serve with nothing but defaults, at 32, 64, 128
and 256 px models (the scene window and overlap derive from the model's input size)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import requests

from segray.devtools import synth
from segray.devtools.ports import free_port
from segray.io import imagery

SIZES = (32, 64, 128, 256)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, str]:
    import keras

    from segray.models import build_model, saving

    keras.utils.set_random_seed(0)
    out = {}
    for size in SIZES:
        options = {"base_filters": 4, "depth": 2}
        model = build_model("unet", 2, (size, size, 3), **options)
        card = saving.ModelCard(
            name="unet", num_classes=2, input_shape=(size, size, 3), options=options
        )
        folder = str(tmp_path_factory.mktemp(f"defaults-{size}") / "model")
        saving.save_model(model, card, folder)
        out[size] = folder
    return out


@pytest.mark.slow
def test_scene_jobs_and_serve_take_every_model_size_with_defaults(models, tmp_path, ray_local):
    """``segray predict --scene`` on a 300 px scene and ``/v1/segment`` on an image 2.5 times the
    model's side (windows with the default overlap) succeed with no setting given, whatever the
    model's size."""
    from ray import serve as ray_serve

    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.serve import app as serve
    from segray.serve.config import ServeConfig

    root = tmp_path / "in"
    synth.write_collection(str(root), layout="scene", count=1, scene_size=300, mode="binary")
    scene = root / "scenes" / "scene_000.tif"
    for size, model in models.items():
        out = tmp_path / f"out-{size}"
        result = predict(PredictConfig(model=model, input=str(scene), output=str(out), scene=True))
        assert result.ok and result.counts["ok"] == 1, (size, result.summary())
        with rasterio.open(out / "scene_000.tif") as ds:
            assert ds.shape == (300, 300) and set(np.unique(ds.read(1))) <= {0, 1}

    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for size, model in models.items():
            name = f"defaults-{size}"
            ray_serve.run(
                serve.build_app(ServeConfig(model_uri=model)), name=name, route_prefix="/"
            )
            side = size * 5 // 2 + 3  # windows with the default overlap, an odd remainder
            body = imagery.encode_png(synth.generate_tile(side, 1, "binary")[0])
            answer = requests.post(f"http://127.0.0.1:{port}/v1/segment", data=body, timeout=120)
            assert answer.status_code == 200, (size, answer.text[:300])
            assert imagery.decode(answer.content).array.shape[:2] == (side, side)
            ray_serve.delete(name)
    finally:
        ray_serve.shutdown()
