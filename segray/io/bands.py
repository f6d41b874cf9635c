"""Band statistics as the model card keeps them, valid-pixel masks and the one normalisation.

Training measures each band over the valid pixels of its training set
(:class:`segray.datasets.stats.StatsSampler`: exact mean and standard deviation, percentiles from
a bounded random sample) and the model card keeps them (:class:`BandStats`) with the rule it chose
(:data:`Method`). Training, bulk prediction, Serve and evaluation then turn pixels into model
input through :func:`normalize` with that card, and nothing else: a mask made on one path is the
mask made on every other.

Valid pixels: a decoded tile carries ``valid`` (H, W) when its file says some pixels are not
data (a nodata value, an internal mask or an alpha band); :func:`apply_nodata` adds a value the
file lacks (``--nodata``). Invalid pixels go into the model as 0 (the band mean under ``stats``)
and come out as :data:`NODATA_CLASS` in every output raster.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import StrictInt, model_validator

from segray.errors import ModelError
from segray.io.imagery import MASK_NODATA
from segray.settings import Settings, setting

if TYPE_CHECKING:
    from segray.io.imagery import Tile

#: How pixels become model input: per-band standardisation, a p2–p98 stretch to [0, 1], or a
#: division by a fixed scale (255 for uint8).
Method = Literal["stats", "percentile", "scale"]
#: The value of a masked pixel in class masks, probability and uncertainty rasters.
NODATA_CLASS = MASK_NODATA


class BandStats(Settings):
    """Statistics of each band over the valid training pixels."""

    error = ModelError

    mean: tuple[float, ...] = setting(help="Mean of each band.")
    std: tuple[float, ...] = setting(help="Standard deviation of each band.")
    p2: tuple[float, ...] = setting(help="2nd percentile of each band.")
    p98: tuple[float, ...] = setting(help="98th percentile of each band.")
    pixels: StrictInt = setting(help="Valid pixels the mean and std cover.", ge=1)
    sampled: StrictInt = setting(help="Pixels the percentiles were taken from.", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> BandStats:
        n = len(self.mean)
        if not n or any(len(v) != n for v in (self.std, self.p2, self.p98)):
            raise ValueError("mean, std, p2 and p98 need one value per band, all of one length")
        values = (*self.mean, *self.std, *self.p2, *self.p98)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("statistics must be finite")
        ordered = all(a <= b for a, b in zip(self.p2, self.p98, strict=True))
        if any(s < 0 for s in self.std) or not ordered:
            raise ValueError("std must be >= 0 and p2 <= p98 in every band")
        return self

    @property
    def count(self) -> int:
        """Bands described."""
        return len(self.mean)


def default_method(dtype: str) -> Method:
    """The rule for a pixel type when none is asked for: 8-bit imagery is divided by 255 (the
    convention pretrained backbones follow); anything else is standardised per band."""
    return "scale" if dtype == "uint8" else "stats"


def default_scale(dtype: object) -> float:
    """The ``scale`` divisor of a pixel type: its largest value for integers, 1 for float."""
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    return {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0}.get(name, 1.0)


def normalize(
    array: np.ndarray,
    method: Method = "scale",
    *,
    scale: float | None = None,
    stats: BandStats | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels (…, C) to float32 model input by ``method``; invalid pixels (``valid`` False)
    become 0. ``scale`` defaults from the pixel type; ``stats`` are required by the other rules."""
    x = np.asarray(array, dtype=np.float32)
    if method == "scale":
        x = x / np.float32(scale if scale is not None else default_scale(array.dtype))
    else:
        if stats is None:
            raise ModelError(f"normalisation {method!r} needs band statistics; none were given")
        if stats.count != x.shape[-1]:
            raise ModelError(
                f"band statistics describe {stats.count} band(s) but the image has {x.shape[-1]}"
            )
        if method == "stats":
            std = np.asarray(stats.std, np.float32)
            x = (x - np.asarray(stats.mean, np.float32)) / np.where(std > 0, std, 1)
        else:
            lo, hi = np.asarray(stats.p2, np.float32), np.asarray(stats.p98, np.float32)
            x = (np.clip(x, lo, hi) - lo) / np.where(hi > lo, hi - lo, 1)
    if valid is not None and not valid.all():
        x = np.where(valid[..., None], x, np.float32(0))
    return np.ascontiguousarray(x, dtype=np.float32)


def apply_nodata(tile: Tile, nodata: float | None) -> Tile:
    """``tile`` with pixels equal to ``nodata`` in every band marked invalid (``--nodata``, for
    files that lack one); a value already in the file wins, and None changes nothing."""
    if nodata is None or tile.meta.get("nodata") is not None or not tile.array.size:
        return tile
    same = np.isnan(tile.array) if math.isnan(nodata) else tile.array == nodata
    invalid = same.all(axis=-1)
    if invalid.any():
        tile.valid = ~invalid if tile.valid is None else tile.valid & ~invalid
    return tile
