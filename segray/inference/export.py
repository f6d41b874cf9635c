"""A segray model out of segray: ONNX, a TensorFlow SavedModel or LiteRT, each with its card, and
a STAC Machine Learning Model (MLM) item beside every model.

The exported graph is the saved model (what it needs to see its input right, such as a
backbone's preprocessing, is a layer inside it) with the class probabilities as its one output,
``probabilities`` (sigmoid of a binary model's one channel, else softmax): what ONNX Runtime,
QGIS's Deepness plugin or a STAC-driven service expect. Its input, ``image``, is the pixels
normalised by the card's rule (``value_scaling`` in the MLM item says how, band by band); no-data
pixels go in as 0, as segray feeds them.

- ONNX (Keras 3's exporter): the card rides along as metadata properties — ``segray:card`` (the
  whole ``model.json``) and the keys Deepness reads (``model_type``, ``class_names``,
  ``tiles_size``, ``tiles_overlap``, ``seg_thresh``).
- SavedModel: the card as ``model.json`` inside the SavedModel folder (``assets.extra``).
- LiteRT (``.tflite``): the card as ``model.json`` beside it.

This module sits in the inference layer because an export carries segray's inference recipe
with it: window size, overlap, threshold and class colours.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from segray.errors import ConfigError
from segray.inference.render import PALETTE
from segray.inference.tiling import default_overlap
from segray.io import storage
from segray.settings import Settings, setting

if TYPE_CHECKING:
    from segray.io.files import FileSystem
    from segray.models.card import ModelCard

Format = Literal["onnx", "saved_model", "litert"]
FORMATS: tuple[str, ...] = get_args(Format)
#: The exported file (or folder) of each format, Keras's name for it, and its MLM artifact type.
ARTIFACTS: dict[str, tuple[str, str, str]] = {
    "onnx": ("model.onnx", "onnx", "onnx"),
    "saved_model": ("saved_model", "tf_saved_model", "tf.saved_model"),
    "litert": ("model.tflite", "litert", "litert"),
}
MEDIA_TYPES = {
    "onnx": "application/octet-stream; framework=onnx; profile=onnx",
    "saved_model": "application/octet-stream; framework=tensorflow; profile=saved_model",
    "litert": "application/octet-stream; framework=litert; profile=tflite",
    "keras": "application/octet-stream; framework=keras; profile=keras",
}
MLM_FILE = "mlm.json"
CARD_KEY = "segray:card"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


class ExportConfig(Settings, storage.Addressed):
    """What to export, to which format, and where."""

    model: str = setting("", "Run folder or model.keras (local or s3://).", cli=False)
    format: Format = setting("onnx", "Format of the exported model.")
    out: str | None = setting(None, "Output folder (default: <model>/export/<format>).")
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")

    @property
    def folder(self) -> str:
        """``out``, else ``export/<format>`` in the model's folder, which its card then names
        (``--runtime onnx`` finds the ONNX export there)."""
        if self.out:
            return self.out
        from segray.models.saving import resolve

        folder = resolve(self.model)[1].rsplit("/", 1)[0]
        return storage.join(folder, "export", self.format)


@dataclass(frozen=True)
class Exported:
    """Where an export went: the model file (or folder), its card and its MLM item."""

    model: str
    card: str
    item: str


def export_model(config: ExportConfig) -> Exported:
    """Export the model of ``config.model`` to ``config.format`` in ``config.folder``: the model,
    its card and its MLM item, each written whole."""
    from segray.models import saving

    if not config.model:
        raise ConfigError("export: give the run folder or model.keras to export")
    if config.format == "onnx":
        _require("onnx", "tf2onnx")
    model, card = saving.load_model(config.model, config.fs(config.model))
    name, keras_format, _ = ARTIFACTS[config.format]
    out, fs = config.folder, config.fs(config.folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        graph = probability_model(model, card)
        graph.export(path, format=keras_format, verbose=False)
        if config.format == "onnx":
            add_onnx_metadata(path, card)
        elif config.format == "saved_model":
            extra = os.path.join(path, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, saving.CARD_FILE), "w") as f:
                f.write(card.to_json())
        for local in _files(path):
            relative = os.path.relpath(local, tmp).replace(os.sep, "/")
            with open(local, "rb") as f:
                fs.write_bytes(storage.join(out, relative), f.read())
        size = sum(os.path.getsize(p) for p in _files(path))
    if config.out is None:  # in the model's own folder: its card says the export exists
        relative = f"export/{config.format}/{name}"
        card = card.replace(exports={**card.exports, config.format: relative})
    card_uri = storage.join(out, saving.CARD_FILE)
    fs.write_text(card_uri, card.to_json())
    item = mlm_item(card, config.format, name, size, model.count_params())
    item_uri = storage.join(out, MLM_FILE)
    fs.write_text(item_uri, json.dumps(item, indent=2))
    if config.out is None:  # last: the card names the export once the export is whole
        source = config.fs(config.model)
        source.write_text(saving.resolve(config.model)[1], card.to_json())
    return Exported(storage.join(out, name), card_uri, item_uri)


def _require(*modules: str) -> None:
    """Refuse an export whose libraries are not installed, saying how to get them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install 'segray[export]'")


def write_run_item(folder: str, fs: FileSystem) -> str:
    """The MLM item of a run folder's ``model.keras`` (its best epoch), written beside it."""
    from segray.models import saving

    card = saving.load_card(folder, fs)
    size = len(fs.read_bytes(storage.join(folder, saving.MODEL_FILE)))
    uri = storage.join(folder, MLM_FILE)
    fs.write_text(uri, json.dumps(mlm_item(card, "keras", saving.MODEL_FILE, size), indent=2))
    return uri


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)


def probability_model(model: Any, card: ModelCard) -> Any:
    """``model`` with its class probabilities as the one output, ``probabilities``, on an
    ``image`` input of the card's window size (any batch)."""
    import keras

    image = keras.Input(shape=tuple(card.input_shape), name=INPUT_NAME)
    logits = model(image, training=False)
    activation = "sigmoid" if logits.shape[-1] == 1 else "softmax"
    probs = keras.layers.Activation(activation, name=OUTPUT_NAME, dtype="float32")(logits)
    graph = keras.Model(image, probs, name=f"{card.name}_probabilities")
    graph.predict_on_batch(np.zeros((1, *card.input_shape), np.float32))  # built: Keras exports it
    return graph


def deepness_metadata(card: ModelCard) -> dict[str, str]:
    """The metadata keys QGIS's Deepness plugin reads from an ONNX segmentation model (its
    "add metadata to model" page): type, class names by id, tile size, overlap in per cent of
    the tile, and the probability threshold."""
    size = min(card.input_shape[:2])
    overlap = default_overlap(tuple(card.input_shape[:2]))
    names = dict(enumerate(card.names()))
    return {
        "model_type": json.dumps("Segmentor"),
        "class_names": json.dumps(names),
        "tiles_size": json.dumps(int(size)),
        "tiles_overlap": json.dumps(round(100 * overlap / size)),
        "seg_thresh": json.dumps(card.threshold),
    }


def add_onnx_metadata(path: str, card: ModelCard) -> None:
    """Name the inputs and outputs, and write the card (``segray:card``) and
    :func:`deepness_metadata` into the ONNX file."""
    import onnx

    model = onnx.load(path)
    _name_io(model.graph)
    entries = {CARD_KEY: card.to_json(), **deepness_metadata(card)}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, path)


def _name_io(graph: Any) -> None:
    """Name the graph's input ``image`` and its output ``probabilities`` (the exporter names
    them after TensorFlow's tensors), and their first axis ``batch``."""
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        value.type.tensor_type.shape.dim[0].dim_param = "batch"


def value_scaling(card: ModelCard) -> list[dict[str, Any]]:
    """The card's normalisation as MLM value-scaling objects, one per band: ``scale`` (divide by
    the type's maximum), ``z-score`` (the training pixels' mean and standard deviation) or
    ``min-max`` (their 2nd and 98th percentiles, values clipped to them first)."""
    bands = card.channels
    if card.normalize == "scale":
        return [{"type": "scale", "value": float(card.scale or 1.0)}] * bands
    stats = card.stats
    if stats is None:  # a card without statistics cannot say more
        return []
    if card.normalize == "stats":
        return [
            {"type": "z-score", "mean": float(m), "stddev": float(s) if s > 0 else 1.0}
            for m, s in zip(stats.mean, stats.std, strict=True)
        ]
    return [
        {"type": "min-max", "minimum": float(lo), "maximum": float(hi)}
        for lo, hi in zip(stats.p2, stats.p98, strict=True)
    ]


def _band_names(card: ModelCard) -> list[str]:
    return [f"b{b}" for b in (card.bands or range(1, card.channels + 1))]


def _colour(i: int) -> str:
    r, g, b = PALETTE[i % len(PALETTE)]
    return f"#{r:02X}{g:02X}{b:02X}"


def mlm_item(
    card: ModelCard, fmt: str, href: str, size: int | None = None, parameters: int | None = None
) -> dict[str, Any]:
    """A STAC Item with the Machine Learning Model extension describing the model at ``href``
    (relative to the item) in ``fmt`` (an export format, or ``keras``): bands and their
    statistics, input shape and normalisation, classes and colours, output, framework and
    runtime, precision. Checked by ``stac-model`` before it is returned."""
    h, w, c = card.input_shape
    k = card.num_classes
    channels = 1 if k == 2 else k
    stats = card.stats
    bands = []
    for i, name in enumerate(_band_names(card)):
        band: dict[str, Any] = {"name": name, "data_type": card.dtype or "float32"}
        if stats is not None:  # of the training pixels; their 2nd and 98th percentiles too
            band["statistics"] = {"mean": stats.mean[i], "stddev": stats.std[i]}
            band["segray:p2"], band["segray:p98"] = stats.p2[i], stats.p98[i]
        bands.append(band)
    model_input = {
        "name": INPUT_NAME,
        "bands": [b["name"] for b in bands],
        "input": {
            "shape": [-1, h, w, c],
            "dim_order": ["batch", "height", "width", "bands"],
            "data_type": "float32",
        },
        "value_scaling": value_scaling(card) or None,
        "resize_type": None,
    }
    classes = [
        {"value": i, "name": name, "color_hint": _colour(i)[1:]}
        for i, name in enumerate(card.names())
    ]
    output = {
        "name": OUTPUT_NAME,
        "tasks": ["semantic-segmentation"],
        "result": {
            "shape": [-1, h, w, channels],
            "dim_order": ["batch", "height", "width", "classes"],
            "data_type": "float32",
        },
        "classification:classes": classes,
        "post_processing_function": {
            "format": "text",
            "expression": (
                f"class 1 where probability >= {card.threshold}"
                if channels == 1
                else "class = argmax over the last axis"
            ),
        },
    }
    framework = {
        "keras": ("Keras", _version("keras")),
        "onnx": ("ONNX", _version("onnx")),
        "saved_model": ("TensorFlow", _version("tensorflow")),
        "litert": ("LiteRT", _version("tensorflow")),
    }[fmt]
    properties: dict[str, Any] = {
        "mlm:name": f"{card.name} {card.version}".strip(),
        "mlm:architecture": card.name + (f" ({card.encoder} encoder)" if card.encoder else ""),
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": framework[0],
        "mlm:framework_version": framework[1],
        "mlm:accelerator": None,
        "mlm:accelerator_constrained": False,
        "mlm:pretrained": bool(card.encoder and card.options.get("weights")),
        "mlm:input": [model_input],
        "mlm:output": [output],
        "mlm:hyperparameters": {
            "precision": card.precision,
            "threshold": card.threshold,
            "normalize": card.normalize,
            "input_multiple": card.input_multiple,
            "epoch": card.epoch,
        },
        "datetime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": f"segray {card.name} model, version {card.version or 'unknown'}",
    }
    if parameters is not None:
        properties["mlm:total_parameters"] = int(parameters)
    if size is not None:
        properties["file:size"] = int(size)
    _, _, artifact = ARTIFACTS.get(fmt, ("", "", "keras"))
    item = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/mlm/v1.4.0/schema.json",
            "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
        ],
        "id": f"segray-{card.name}-{card.version or 'model'}-{fmt}",
        "geometry": None,
        "properties": {
            k: v for k, v in properties.items() if v is not None or k.startswith("mlm:acc")
        },
        "links": [],
        "assets": {
            "model": {
                "href": href,
                "type": MEDIA_TYPES[fmt],
                "roles": ["mlm:model", "mlm:weights", "data"],
                "mlm:artifact_type": artifact,
                "bands": bands,
            },
            "card": {
                "href": "model.json",
                "type": "application/json",
                "roles": ["metadata"],
                "title": "segray model card",
            },
        },
    }
    check_mlm(item)
    return item


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def check_mlm(item: dict[str, Any]) -> None:
    """Validate the item's MLM properties with ``stac-model`` (its pydantic schema); a
    :class:`ValueError` says which field is wrong."""
    from stac_model.schema import MLModelProperties

    MLModelProperties.model_validate(item["properties"])
