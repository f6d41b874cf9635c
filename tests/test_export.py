"""`segray export`: ONNX, SavedModel and LiteRT agree with Keras on real tiles, carry the card,
and an ONNX export runs where TensorFlow cannot be imported; the STAC MLM items validate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from segray.inference import export
from segray.models import saving

REAL = Path(__file__).parent / "data" / "real"
SIZE = 32


def osbs_tiles() -> tuple[np.ndarray, np.ndarray]:
    """The OSBS tree-crown crop (NEON RGB, 0.1 m) as 32 px tiles: images and crown masks."""
    with rasterio.open(REAL / "osbs_rgb.tif") as f:
        image = np.moveaxis(f.read(), 0, -1)
    with rasterio.open(REAL / "osbs_trees.tif") as f:
        mask = f.read(1)
    n = image.shape[0] // SIZE

    def cut(a: np.ndarray) -> np.ndarray:
        rows = [a[r * SIZE : (r + 1) * SIZE] for r in range(n)]
        return np.stack([row[:, c * SIZE : (c + 1) * SIZE] for row in rows for c in range(n)])

    return cut(image), cut(mask)


NO_TENSORFLOW = """
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError("no " + name + " here")
sys.meta_path.insert(0, Refuse())
"""


def without_tensorflow(script: str) -> dict:
    """Run ``script`` in a fresh Python whose imports of TensorFlow and Keras fail; its last
    line of output, as JSON."""
    code = NO_TENSORFLOW + script
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A U-Net fitted on the western half of the real OSBS tiles, and the eastern half's model
    input (normalised by its card) held out for the comparisons."""
    from segray.devtools.fitted import fit_on

    images, masks = osbs_tiles()
    n = int(np.sqrt(len(images)))
    west = np.array([i % n < n // 2 for i in range(len(images))])
    folder = str(tmp_path_factory.mktemp("osbs-run"))
    fit_on(folder, images[west], masks[west], epochs=20, class_names=("other", "tree"))
    card = saving.load_card(folder)
    held_out = np.stack([card.normalize_pixels(image) for image in images[~west]])
    return folder, held_out


def keras_probabilities(folder: str, x: np.ndarray) -> np.ndarray:
    import keras

    model, _ = saving.load_model(folder)
    return np.asarray(keras.ops.sigmoid(model.predict_on_batch(x)))


def run_format(fmt: str, path: str, x: np.ndarray) -> np.ndarray:
    """Probabilities of the exported model at ``path`` in its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run([export.OUTPUT_NAME], {export.INPUT_NAME: x})[0]
    import tensorflow as tf

    if fmt == "saved_model":
        loaded = tf.saved_model.load(path)  # kept: its functions use its variables
        return np.asarray(loaded.serve(tf.constant(x)))
    interpreter = tf.lite.Interpreter(model_path=path)
    (signature,) = interpreter.get_signature_list().values()
    (name,) = signature["inputs"]
    runner = interpreter.get_signature_runner()
    out = [runner(**{name: x[i : i + 1]}) for i in range(len(x))]
    return np.concatenate([next(iter(o.values())) for o in out])


def test_every_format_agrees_with_keras_on_real_tiles_and_carries_the_card(run, tmp_path):
    folder, x = run
    card = saving.load_card(folder)
    expected = keras_probabilities(folder, x)
    reference = expected >= card.threshold
    share = reference.mean()
    assert 0.1 < share < 0.9, share  # a fitted model: both classes on the held-out tiles
    rows = []
    for fmt in export.FORMATS:
        done = export.export_model(
            export.ExportConfig(model=folder, format=fmt, out=str(tmp_path / fmt))
        )
        got = run_format(fmt, done.model, x)
        delta = float(np.abs(got - expected).max())
        agree = float(np.mean((got >= card.threshold) == reference))
        rows.append((fmt, delta, agree))
        assert delta < 1e-4 and agree >= 0.999, (fmt, delta, agree)
        assert saving.load_card(str(tmp_path / fmt)) == card
        item = json.loads(Path(done.item).read_text())
        export.check_mlm(item)
        assert item["assets"]["model"]["href"] == Path(done.model).name
    print("\nformat       max|Δp|   masks identical")
    for fmt, delta, agree in rows:
        print(f"{fmt:12s} {delta:.1e}   {100 * agree:.3f} %")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "onnx" / "model.onnx")).metadata_props}
    assert saving.ModelCard.from_json(meta[export.CARD_KEY]) == card
    assert json.loads(meta["model_type"]) == "Segmentor"
    assert json.loads(meta["class_names"]) == {"0": "other", "1": "tree"}
    assert (
        json.loads(meta["tiles_size"]) == SIZE and json.loads(meta["seg_thresh"]) == card.threshold
    )
    saved = tmp_path / "saved_model" / "saved_model" / "assets.extra" / saving.CARD_FILE
    assert saving.ModelCard.from_json(saved.read_text()) == card


def test_an_onnx_export_runs_where_tensorflow_cannot_be_imported(run, tmp_path):
    folder, x = run
    done = export.export_model(export.ExportConfig(model=folder, out=str(tmp_path)))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", keras_probabilities(folder, x))
    script = f"""
import numpy as np, onnxruntime as ort
try:
    import tensorflow
    raise SystemExit("tensorflow imported")
except ImportError:
    pass
session = ort.InferenceSession({done.model!r}, providers=["CPUExecutionProvider"])
card = json.loads(session.get_modelmeta().custom_metadata_map["segray:card"])
x = np.load({str(tmp_path / "x.npy")!r})
got = session.run(None, {{"image": x}})[0]
expected = np.load({str(tmp_path / "expected.npy")!r})
same = ((got >= card["threshold"]) == (expected >= card["threshold"])).mean()
loaded = sorted(m for m in sys.modules if m.startswith(("tensorflow", "keras")))
delta = float(abs(got - expected).max())
print(json.dumps({{"delta": delta, "same": float(same), "modules": loaded}}))
"""
    result = without_tensorflow(script)
    assert result["modules"] == [] and result["delta"] < 1e-4 and result["same"] >= 0.999, result


def test_mlm_items_describe_the_model_and_a_wrong_field_is_refused(run, tmp_path):
    folder, _ = run
    card = saving.load_card(folder)
    uri = export.write_run_item(folder, saving.storage.filesystem(folder))
    item = json.loads(Path(uri).read_text())
    props = item["properties"]
    (model_input,) = props["mlm:input"]
    assert model_input["input"]["shape"] == [-1, SIZE, SIZE, 3]
    assert model_input["value_scaling"] == [{"type": "scale", "value": 255.0}] * 3
    (output,) = props["mlm:output"]
    assert [c["name"] for c in output["classification:classes"]] == ["other", "tree"]
    assert props["mlm:hyperparameters"]["threshold"] == card.threshold
    assert item["assets"]["model"]["mlm:artifact_type"] == "keras"
    bad = json.loads(json.dumps(item))
    bad["properties"]["mlm:tasks"] = ["painting"]
    with pytest.raises(ValueError, match="tasks"):
        export.check_mlm(bad)
    # a model standardised by band statistics says so band by band, with the statistics
    stats = saving.ModelCard(
        name="unet",
        num_classes=3,
        input_shape=(SIZE, SIZE, 2),
        normalize="stats",
        stats={
            "mean": [1.0, 2.0],
            "std": [0.5, 0.0],
            "p2": [0, 0],
            "p98": [4, 5],
            "pixels": 10,
            "sampled": 10,
        },
    )
    doc = export.mlm_item(stats, "onnx", "model.onnx")
    scaling = doc["properties"]["mlm:input"][0]["value_scaling"]
    assert scaling == [
        {"type": "z-score", "mean": 1.0, "stddev": 0.5},
        {"type": "z-score", "mean": 2.0, "stddev": 1.0},
    ]
    band = doc["assets"]["model"]["bands"][1]
    assert band["statistics"] == {"mean": 2.0, "stddev": 0.0} and band["segray:p98"] == 5
    assert doc["properties"]["mlm:output"][0]["result"]["shape"] == [-1, SIZE, SIZE, 3]


def test_the_export_command_writes_the_files_and_names_a_missing_model(run, tmp_path):
    from segray.cli import cli

    folder, _ = run
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["export", folder, "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and (out / "mlm.json").is_file()
    assert str(out / "model.onnx") in result.output
    missing = CliRunner().invoke(cli, ["export", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "nothing" in missing.output and "no model" in missing.output
    bad = CliRunner().invoke(cli, ["export", folder, "--format", "pt"])
    assert bad.exit_code == 2 and "--format" in bad.output


def osbs_scenes(tmp_path: Path, side: int = 64) -> list[Path]:
    """GeoTIFF tiles of ``side`` px (larger than the model: windows stitched) cut from the
    eastern half of the real OSBS crop, the part the model never saw."""
    from segray.io import imagery

    with rasterio.open(REAL / "osbs_rgb.tif") as f:
        image, transform, crs = np.moveaxis(f.read(), 0, -1), f.transform, f.crs
    folder = tmp_path / "tiles"
    folder.mkdir()
    paths = []
    for r in range(0, image.shape[0] - side + 1, side):
        for c in range(image.shape[1] // 2, image.shape[1] - side + 1, side):
            data = imagery.encode_geotiff(
                image[r : r + side, c : c + side],
                crs.to_string(),
                transform * transform.translation(c, r),
            )
            path = folder / f"t_{r:03d}_{c:03d}.tif"
            path.write_bytes(data)
            paths.append(path)
    return paths


def test_the_onnx_runtime_gives_the_keras_masks_and_never_imports_tensorflow(run, tmp_path):
    from segray.errors import ConfigError
    from segray.inference.segmenter import Segmenter
    from segray.io.imagery import decode

    folder, _ = run
    with pytest.raises(ConfigError, match="segray export .* --format onnx"):
        Segmenter.load(folder, runtime="onnx")
    export.export_model(export.ExportConfig(model=folder))  # into the run: its card says so
    assert saving.load_card(folder).exports == {"onnx": "export/onnx/model.onnx"}
    with pytest.raises(ConfigError, match="fp32"):
        Segmenter.load(folder, precision="bf16", runtime="onnx")
    from segray.errors import ModelError

    card = saving.load_card(folder)
    with pytest.raises(ModelError, match="export it again"):  # a model changed since its export
        Segmenter.load(folder, card=card.replace(version="0123456789ab"), runtime="onnx")
    tiles = [decode(p.read_bytes()) for p in osbs_scenes(tmp_path)]
    masks = {}
    for runtime in ("keras", "onnx"):
        segmenter = Segmenter.load(folder, runtime=runtime, tta="flips", overlap=16)
        masks[runtime] = np.stack([m.mask for m in segmenter.segment(tiles)])
    same = float(np.mean(masks["onnx"] == masks["keras"]))
    print(f"\nonnx vs keras on {len(tiles)} real 64 px tiles (flips): {100 * same:.3f} % identical")
    assert same >= 0.999 and 0.1 < masks["keras"].mean() < 0.9
    # a bulk Predictor on the onnx runtime, in a process where TensorFlow cannot be imported
    np.save(tmp_path / "expected.npy", masks["keras"])
    uris = [str(p) for p in sorted((tmp_path / "tiles").glob("*.tif"))]
    script = f"""
import numpy as np
from segray.bulk import stages
from segray.bulk.config import PredictConfig
from segray.bulk.predictor import Predictor
from segray.bulk.rows import objects, unpack
uris = {uris!r}
config = PredictConfig(model={folder!r}, input="unused", output="unused", runtime="onnx",
                       tta="flips", overlap=16)
batch = stages.read_tiles({{"input_uri": objects(uris)}}, config)
out = Predictor(config)(batch)
assert not any(out["error"]), out["error"]
got = np.stack([unpack(p, s[:2], d) for p, s, d in zip(out["pixels"], out["shape"], out["dtype"])])
expected = np.load({str(tmp_path / "expected.npy")!r})
loaded = sorted(m for m in sys.modules if m.startswith(("tensorflow", "keras")))
print(json.dumps({{"same": float((got == expected).mean()), "modules": loaded}}))
"""
    result = without_tensorflow(script)
    assert result["modules"] == [] and result["same"] >= 0.999, result


def test_a_bulk_job_on_the_onnx_runtime_writes_the_keras_masks(run, ray_local, tmp_path):
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.io.imagery import decode

    folder, _ = run
    export.export_model(export.ExportConfig(model=folder))
    osbs_scenes(tmp_path)
    written = {}
    for runtime in ("keras", "onnx"):
        out = tmp_path / runtime
        job = PredictConfig(model=folder, input=str(tmp_path / "tiles"), output=str(out))
        assert predict(job.replace(runtime=runtime)).ok
        written[runtime] = np.stack(
            [decode(p.read_bytes()).array[..., 0] for p in sorted(out.glob("*.tif"))]
        )
    assert written["onnx"].shape == written["keras"].shape and len(written["onnx"]) >= 12
    assert np.mean(written["onnx"] == written["keras"]) >= 0.999
