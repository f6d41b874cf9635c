"""Trained models as files: ``model.keras`` plus ``model.json`` (the model card), local or s3://.

Training writes them; bulk prediction, Serve and evaluation load them by a URI that is either a
run folder, a checkpoint folder, or a ``.keras`` file with its card beside it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import TYPE_CHECKING

from segray.errors import ModelError, StorageError
from segray.io import storage
from segray.io.files import FileSystem
from segray.models.card import ModelCard

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"
CARD_FILE = "model.json"


def save_model(
    model: keras.Model, card: ModelCard, folder: str, fs: FileSystem | None = None
) -> ModelCard:
    """Write ``folder/model.keras`` and ``folder/model.json``; the card's version is the file hash.

    The card goes second, so a folder with a card always has its whole model beside it. ``fs``
    holds the folder (by default the one :func:`storage.filesystem` chooses).
    """
    fs = fs or storage.filesystem(folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f:
            data = f.read()
    card = card.replace(version=hashlib.sha256(data).hexdigest()[:12])
    fs.write_bytes(storage.join(folder, MODEL_FILE), data)
    fs.write_text(storage.join(folder, CARD_FILE), card.to_json())
    return card


def resolve(uri: str) -> tuple[str, str]:
    """``(model file URI, card URI)`` for a run folder, checkpoint folder or ``.keras`` file."""
    if uri.endswith(".keras"):
        folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
        return uri, storage.join(folder, CARD_FILE)
    return storage.join(uri, MODEL_FILE), storage.join(uri, CARD_FILE)


def load_card(uri: str, fs: FileSystem | None = None) -> ModelCard:
    """Read the model card of a model URI (held by ``fs``, by default the one
    :func:`storage.filesystem` chooses)."""
    _, card_uri = resolve(uri)
    try:
        text = (fs or storage.filesystem(uri)).read_text(card_uri)
    except StorageError as exc:
        raise StorageError(
            f"{uri}: no model here ({exc}); give a training run folder or a model.keras file"
        ) from exc
    return ModelCard.from_json(text, card_uri)


def vet(uri: str, fs: FileSystem | None = None, card: ModelCard | None = None) -> ModelCard:
    """The card of the model at ``uri`` once its file holds nothing Keras's safe mode would
    refuse and the card fits it (:func:`segray.models.vetting.vet_file`: no Keras, milliseconds);
    drivers call it before any actor or replica loads the model."""
    from segray.models.vetting import vet_file

    fs = fs or storage.filesystem(uri)
    card = card or load_card(uri, fs)
    model_uri, card_uri = resolve(uri)
    try:
        data = fs.read_bytes(model_uri)
    except StorageError as exc:
        raise ModelError(f"{model_uri}: cannot read the model: {exc}") from None
    vet_file(data, card, model_uri, card_uri)
    return card


def load_model(
    uri: str, fs: FileSystem | None = None, card: ModelCard | None = None
) -> tuple[keras.Model, ModelCard]:
    """Load a model and its card (``safe_mode=True``: no arbitrary code from the file); a
    ``card`` already read is not read again."""
    from segray.models.layers import set_monte_carlo
    from segray.models.registry import load_keras
    from segray.models.vetting import vet_file

    model_uri, card_uri = resolve(uri)
    fs = fs or storage.filesystem(uri)
    card = card or load_card(uri, fs)
    data = fs.read_bytes(model_uri)
    vet_file(data, card, model_uri, card_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(data)
        try:
            model = load_keras(path)
        except (ValueError, TypeError, KeyError, OSError) as exc:  # Keras's refusals
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            raise ModelError(f"{model_uri}: Keras cannot load it: {reason}") from exc
    card.check_against(model, card_uri)
    # Monte-Carlo dropout stays off unless a caller asks for samples (inference.infer_mc).
    set_monte_carlo(model, False)
    return model, card
