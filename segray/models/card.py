"""The model card (``model.json``): everything needed to use a trained model the way it was
trained, in a module of its own so that saving, vetting and every runtime take it without
importing each other."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydantic import StrictInt, model_validator

from segray.errors import ModelError
from segray.io import bands as band_rules
from segray.io.bands import BandStats, Method
from segray.io.imagery import MAX_BANDS, SUPPORTED_DTYPES
from segray.models.precision import Precision
from segray.settings import Settings, setting

#: Largest height or width a card may declare: the model's input, not a scene.
MAX_INPUT_SIDE = 8192


class ModelCard(Settings):
    """Everything needed to use a trained model the way it was trained; every field is checked
    when a card is made or read, and :func:`check_against` checks it against the model itself."""

    error = ModelError

    name: str = setting(help="Registered model name.")
    num_classes: StrictInt = setting(help="Classes, background included.", ge=2, le=256)
    input_shape: tuple[StrictInt, StrictInt, StrictInt] = setting(help="(height, width, bands).")
    class_names: list[str] | None = setting(None, "A name per class.")
    encoder: str | None = setting(None, "keras.applications backbone, if any.")
    options: dict[str, Any] = setting(help="Model options.", default_factory=dict)
    bands: tuple[StrictInt, ...] | None = setting(None, "1-based bands read from inputs.")
    normalize: Method = setting("scale", "How pixels became model input in training.")
    scale: float | None = setting(255.0, "Divisor of the 'scale' rule.", gt=0)
    stats: BandStats | None = setting(None, "Per-band statistics of the training pixels.")
    dtype: str | None = setting(
        None, "Pixel type of the images it was trained on; others are refused (None: any)."
    )
    nodata: float | None = setting(None, "Pixel value read as no data where a file sets none.")
    ignore_index: StrictInt | None = setting(None, "Label id that counted for nothing.")
    threshold: float = setting(0.5, "Probability threshold of binary models.", ge=0, le=1)
    input_multiple: StrictInt = setting(16, "Input sizes must be multiples of this.", ge=1)
    metrics: dict[str, Any] = setting(help="Validation metrics of its epoch.", default_factory=dict)
    epoch: int | None = setting(None, "The epoch it comes from.")
    version: str = setting("", "Hash of the model file.")
    precision: Precision = setting(
        "fp32", "Precision it was trained in; inference runs in it unless told otherwise."
    )
    exports: dict[str, str] = setting(
        help="Its exports by format (`segray export`), paths relative to the model's folder.",
        default_factory=dict,
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        h, w, c = self.input_shape
        if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise ValueError(f"input_shape sides must lie in 1..{MAX_INPUT_SIDE}; got {h}x{w}")
        if not 1 <= c <= MAX_BANDS:
            raise ValueError(f"input_shape bands must lie in 1..{MAX_BANDS}; got {c}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )
        if self.bands is not None and (len(self.bands) != c or min(self.bands) < 1):
            raise ValueError(f"bands must be {c} band numbers >= 1; got {list(self.bands)}")
        if self.scale is not None and not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite; got {self.scale}")
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}; got {self.dtype!r}")
        if self.normalize != "scale" and (self.stats is None or self.stats.count != c):
            raise ValueError(f"normalize {self.normalize!r} needs stats of {c} band(s)")
        return self

    def normalize_pixels(self, array: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Pixels (…, C) as model input by the card's rule (:func:`segray.io.bands.normalize`);
        pixels not ``valid`` become 0."""
        return band_rules.normalize(
            array, self.normalize, scale=self.scale, stats=self.stats, valid=valid
        )

    @property
    def channels(self) -> int:
        """Bands the model expects."""
        return int(self.input_shape[2])

    def names(self) -> list[str]:
        """Class names, ``class_<i>`` where none were given."""
        return list(self.class_names or [f"class_{i}" for i in range(self.num_classes)])

    def to_json(self) -> str:
        """The card as JSON text."""
        return json.dumps(self.model_dump(mode="json"), indent=2, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, source: str = "<card>") -> ModelCard:
        """Parse and check a card; an error names ``source`` and the field at fault. Fields a
        later segray added are ignored, so newer cards still load."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{source}: not a segray model card: {exc}") from exc
        if not isinstance(doc, dict):
            raise ModelError(f"{source}: not a segray model card: a JSON object is expected")
        try:
            return cls(**{k: v for k, v in doc.items() if k in cls.model_fields})
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None

    def check_against(self, model: Any, source: str) -> None:
        """Refuse a card that does not describe ``model``: classes vs output channels, bands
        and input size vs the model's input."""
        from segray.models.options import output_channels

        _, *size, bands = tuple(model.input_shape)
        outputs = int(model.output_shape[-1])
        if outputs != output_channels(self.num_classes):
            raise ModelError(
                f"{source}: num_classes {self.num_classes} does not fit the model, whose "
                f"{outputs} output channel(s) mean {2 if outputs == 1 else outputs} classes"
            )
        if bands is not None and bands != self.channels:
            raise ModelError(
                f"{source}: input_shape has {self.channels} band(s) but the model takes {bands}"
            )
        fixed = [s for s in size if s is not None]
        if len(fixed) == 2 and tuple(fixed) != tuple(self.input_shape[:2]):
            raise ModelError(
                f"{source}: input_shape {list(self.input_shape[:2])} but the model takes {fixed}"
            )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
