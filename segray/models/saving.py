"""Trained models as files: ``model.keras`` plus ``model.json`` (the model card), local or s3://.

Training writes them; bulk prediction, Serve and evaluation load them by a URI that is either a
run folder, a checkpoint folder, or a ``.keras`` file with its card beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segray.errors import ModelError, StorageError
from segray.io import storage

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"
CARD_FILE = "model.json"


@dataclass
class ModelCard:
    """Everything needed to use a trained model the way it was trained."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str] | None = None
    encoder: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    bands: tuple[int, ...] | None = None
    scale: float | None = 255.0
    threshold: float = 0.5
    input_multiple: int = 16
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    version: str = ""

    @property
    def channels(self) -> int:
        """Bands the model expects."""
        return int(self.input_shape[2])

    def names(self) -> list[str]:
        """Class names, ``class_<i>`` where none were given."""
        return list(self.class_names or [f"class_{i}" for i in range(self.num_classes)])

    def to_json(self) -> str:
        """The card as JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, source: str = "<card>") -> ModelCard:
        """Parse a card, refusing unknown or missing fields with a message naming ``source``."""
        try:
            doc = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            card = cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{source}: not a segray model card: {exc}") from exc
        card.input_shape = tuple(card.input_shape)  # type: ignore[assignment]
        card.bands = tuple(card.bands) if card.bands else None
        return card


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def save_model(
    model: keras.Model, card: ModelCard, folder: str, *, endpoint: str | None = None
) -> ModelCard:
    """Write ``folder/model.keras`` and ``folder/model.json``; the card's version is the file hash.

    The card goes second, so a folder with a card always has its whole model beside it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f:
            data = f.read()
    card = dataclasses.replace(card, version=hashlib.sha256(data).hexdigest()[:12])
    storage.write_bytes(storage.join(folder, MODEL_FILE), data, endpoint=endpoint)
    storage.write_text(storage.join(folder, CARD_FILE), card.to_json(), endpoint=endpoint)
    return card


def resolve(uri: str) -> tuple[str, str]:
    """``(model file URI, card URI)`` for a run folder, checkpoint folder or ``.keras`` file."""
    if uri.endswith(".keras"):
        folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
        return uri, storage.join(folder, CARD_FILE)
    return storage.join(uri, MODEL_FILE), storage.join(uri, CARD_FILE)


def load_card(uri: str, *, endpoint: str | None = None) -> ModelCard:
    """Read the model card of a model URI."""
    _, card_uri = resolve(uri)
    try:
        text = storage.read_text(card_uri, endpoint=endpoint)
    except StorageError as exc:
        raise StorageError(
            f"{uri}: no model here ({exc}); give a training run folder or a model.keras file"
        ) from exc
    return ModelCard.from_json(text, card_uri)


def load_model(uri: str, *, endpoint: str | None = None) -> tuple[keras.Model, ModelCard]:
    """Load a model and its card (``safe_mode=True``: no arbitrary code from the file)."""
    from segray.models.layers import set_monte_carlo
    from segray.models.registry import load_keras

    model_uri, _ = resolve(uri)
    card = load_card(uri, endpoint=endpoint)
    data = storage.read_bytes(model_uri, endpoint=endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(data)
        model = load_keras(path)
    # Monte-Carlo dropout stays off unless a caller asks for samples (inference.infer_mc).
    set_monte_carlo(model, False)
    return model, card
