"""`segray eval`: report numbers equal segray.metrics on the same masks; pictures exist."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from segray import inference, metrics, models
from segray.cli import cli
from segray.devtools import synth
from segray.evaluate.evaluate import EvalConfig, evaluate
from segray.evaluate.report import PANEL_PIXELS
from segray.inference.render import PALETTE
from segray.io import imagery, storage
from segray.models import saving


def make_model(folder: str) -> saving.ModelCard:
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_model("unet", 5, (32, 32, 3), base_filters=4, depth=2)
    card = saving.ModelCard(
        name="unet",
        num_classes=5,
        input_shape=(32, 32, 3),
        class_names=list(synth.CLASSES),
        options={"base_filters": 4, "depth": 2},
        input_multiple=4,
    )
    return saving.save_model(model, card, folder)


def test_report_matches_metrics_and_writes_pictures(tmp_path):
    data, run, out = str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "eval")
    synth.write_collection(data, count=6, size=32, seed=5)
    make_model(run)
    doc = evaluate(EvalConfig(model=run, data=data, out=out, worst=3))

    # the same masks, scored independently through the shared path
    model, card = saving.load_model(run)
    cm = metrics.ConfusionMatrix(5)
    for uri in storage.list_files(f"{data}/images"):
        tile = imagery.decode(storage.read_bytes(uri), uri)
        truth = imagery.as_mask(
            imagery.decode(storage.read_bytes(uri.replace("images", "masks"))).array
        )
        pred = inference.render(
            inference.infer(model, inference.prepare(tile, card)[None], card), card
        )
        cm.update(truth[None], pred)
    np.testing.assert_array_equal(np.asarray(doc["confusion_matrix"]), cm.matrix)
    saved = json.loads(storage.read_text(f"{out}/report.json"))
    for key in ("pixel_accuracy", "mean_iou", "mean_dice"):
        assert saved[key] == metrics.ConfusionMatrix(5).add(cm.matrix).summary()[key]
    np.testing.assert_allclose(
        [np.nan if v is None else v for v in saved["iou"]], metrics.iou_per_class(cm.matrix)
    )
    assert saved["tiles"] == 6 and len(saved["worst"]) == 3
    scores = [w["mean_iou"] for w in saved["worst"]]
    assert scores == sorted(scores)
    colours = {tuple(c) for c in np.asarray(PALETTE)[: len(synth.CLASSES)].tolist()}
    for w in saved["worst"]:
        overlay = imagery.decode(storage.read_bytes(w["overlay"]))
        # three panels of at least 256 px (32 px tiles enlarged 8x), and the class colours drawn
        height, width, _ = overlay.shape
        assert height >= PANEL_PIXELS and width >= 3 * PANEL_PIXELS, overlay.shape
        rgb = {tuple(v) for v in overlay.array[..., :3].reshape(-1, 3).tolist()}
        assert len(colours & rgb) >= 2
    heat = imagery.decode(storage.read_bytes(f"{out}/confusion.png"))
    assert heat.shape[0] > 100 and heat.shape[1] > 100
    md = storage.read_text(f"{out}/report.md")
    assert "mean" in md and "worst" in md.lower()


def test_eval_cli(tmp_path):
    data, run, out = str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "eval")
    synth.write_collection(data, count=2, size=32)
    make_model(run)
    result = CliRunner().invoke(cli, ["eval", "--model", run, "--data", data, "--out", out])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and "building" in result.output
