"""Per-band statistics of a training set: exact mean and standard deviation over the valid
pixels, percentiles from a bounded random sample (:class:`StatsSampler`), as the
:class:`~segray.io.bands.BandStats` the model card keeps (the rule that uses them is
:func:`segray.io.bands.normalize`)."""

from __future__ import annotations

import numpy as np

from segray.errors import ModelError
from segray.io.bands import BandStats

#: Pixels kept per image for the percentiles, between these bounds (see :func:`sample_size`).
SAMPLE_PER_IMAGE = (256, 4096)
#: Pixels sampled over the whole training set, at most (its percentiles' precision: ~0.1%).
SAMPLE_TOTAL = 262_144


def sample_size(images: int) -> int:
    """Pixels to sample from each of ``images`` images for the percentiles: the set as a whole
    gives at most about :data:`SAMPLE_TOTAL`, each image within :data:`SAMPLE_PER_IMAGE`."""
    lo, hi = SAMPLE_PER_IMAGE
    return int(min(hi, max(lo, SAMPLE_TOTAL // max(images, 1))))


def image_summary(
    array: np.ndarray, valid: np.ndarray | None, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """One image's share of the statistics: per-band sums and sums of squares (float64) and the
    valid pixel count, and up to ``k`` valid pixels drawn at random (k, C)."""
    pixels = np.asarray(array).reshape(-1, array.shape[-1])
    if valid is not None:
        pixels = pixels[np.asarray(valid).reshape(-1)]
    values = pixels.astype(np.float64)
    pick = rng.choice(len(pixels), size=min(k, len(pixels)), replace=False)
    return values.sum(0), np.square(values).sum(0), len(pixels), pixels[pick].astype(np.float32)


class StatsSampler:
    """Accumulates :func:`image_summary` parts into :class:`BandStats`."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.pixels = 0
        self.samples: list[np.ndarray] = []

    def add(self, sums: np.ndarray, squares: np.ndarray, count: int, sample: np.ndarray) -> None:
        """Add one image's part."""
        if not count:
            return
        self.sums = np.asarray(sums, np.float64) + (0 if self.sums is None else self.sums)
        self.squares = np.asarray(squares, np.float64) + (
            0 if self.squares is None else self.squares
        )
        self.pixels += int(count)
        self.samples.append(np.asarray(sample, np.float32))

    def result(self, what: str = "the training set") -> BandStats:
        """The statistics; a :class:`~segray.errors.ModelError` when no pixel was valid."""
        if not self.pixels or self.sums is None or self.squares is None:
            raise ModelError(f"{what} has no valid pixels to take band statistics from")
        mean = self.sums / self.pixels
        var = np.maximum(self.squares / self.pixels - np.square(mean), 0.0)
        sample = np.concatenate(self.samples)
        p2, p98 = np.percentile(sample, [2, 98], axis=0)
        return BandStats(
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in np.sqrt(var)),
            p2=tuple(float(v) for v in p2),
            p98=tuple(float(v) for v in p98),
            pixels=self.pixels,
            sampled=len(sample),
        )
