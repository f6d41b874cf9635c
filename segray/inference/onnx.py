"""A segray model run by ONNX Runtime: its ONNX export (:mod:`segray.inference.export`) behind the
call segray's inference makes of a model — logits of a float32 batch — so the
:class:`~segray.inference.segmenter.Segmenter` takes either runtime unchanged, and a process that
predicts with it never imports TensorFlow or Keras (0.25 s to open instead of 7 s).

The export outputs class probabilities; :func:`~segray.inference.render.logits_of` turns them
back into logits whose every mask, at every threshold, is the same.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from segray.errors import ConfigError, ModelError
from segray.inference.export import CARD_KEY
from segray.inference.render import logits_of
from segray.io import storage

if TYPE_CHECKING:
    from segray.io.files import FileSystem
    from segray.models.card import ModelCard

Runtime = Literal["keras", "onnx"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
RUNTIME_HELP = (
    "Model runtime: keras, or onnx (ONNX Runtime on the model's ONNX export, made by "
    "`segray export RUN`; no TensorFlow in the process)."
)


class OnnxModel:
    """An ONNX export as a model: ``model(x)`` gives the logits (B, H, W, K) of a float32 batch
    of the card's window size. ``threads``: ONNX Runtime's intra-op threads (default: the CPUs
    Ray gave this process, ``OMP_NUM_THREADS``, else all)."""

    def __init__(self, data: bytes, card: ModelCard, source: str, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or _omp_threads()
        options.inter_op_num_threads = 1
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        try:
            self.session = ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # ONNX Runtime's refusals: a torn or foreign file
            raise ModelError(f"{source}: ONNX Runtime cannot open it: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        exported = json.loads(meta.get(CARD_KEY, "{}")).get("version")
        if exported and card.version and exported != card.version:
            raise ModelError(
                f"{source}: exported from model version {exported}, not {card.version}: the "
                "model changed since; export it again (segray export --format onnx)"
            )
        (self.input,) = (i.name for i in self.session.get_inputs())
        self.output = self.session.get_outputs()[0].name
        self.input_shape = (None, *card.input_shape)
        self.source = source

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        probs = self.session.run([self.output], {self.input: np.asarray(x, np.float32)})[0]
        return logits_of(probs)


def _omp_threads() -> int:
    """The CPUs Ray gave this process (it sets ``OMP_NUM_THREADS``), else 0: ONNX Runtime's
    own choice, every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else 0


def onnx_uri(uri: str, card: ModelCard) -> str:
    """Where the model at ``uri`` keeps its ONNX export, as its card records it."""
    relative = card.exports.get("onnx")
    if not relative:
        raise ConfigError(
            f"{uri}: --runtime onnx needs the model's ONNX export; make it with "
            f"`segray export {uri} --format onnx`"
        )
    from segray.models.saving import resolve

    return storage.join(resolve(uri)[1].rsplit("/", 1)[0], relative)


def load_onnx(
    uri: str, fs: FileSystem | None, card: ModelCard | None, precision: str | None
) -> tuple[OnnxModel, ModelCard]:
    """The ONNX export of the model at ``uri`` opened by ONNX Runtime, and the model's card."""
    from segray.models import saving

    fs = fs or storage.filesystem(uri)
    card = card or saving.load_card(uri, fs)
    if precision not in (None, "fp32"):
        raise ConfigError(f"--runtime onnx computes in fp32; got --precision {precision}")
    where = onnx_uri(uri, card)
    try:
        data = fs.read_bytes(where)
    except Exception as exc:
        raise ModelError(f"{where}: cannot read the ONNX export: {exc}") from None
    return OnnxModel(data, card, where), card
