"""Image + mask augmentations for training, applied identically to both, on numpy batches.

Geometric changes (flips, rot90, crop-resize) move the image, the mask and the valid-pixel map
together, masks with nearest-neighbour sampling so no new class ids appear. Photometric changes
touch the image only, in the model's input space (after the card's normalisation), band by band,
and never clip: a brightness shift of up to ``brightness`` standard deviations of each band, a
contrast change about each band's mean of up to ``contrast`` in log scale, and a hue rotation for
3-band images divided by their scale (RGB). The size of one standard deviation and the mean of
each band in input space come from the training statistics (:class:`Photometry`), so the same
settings mean the same on 8-bit RGB in [0, 1] and on standardised 16-bit multispectral bands.
No-data pixels stay 0, as inference sees them. Works on float32 images (B, H, W, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segray.settings import Settings, setting

if TYPE_CHECKING:
    from segray.models.saving import ModelCard


class AugmentConfig(Settings):
    """Which augmentations run, and how strong they are; ``AugmentConfig.off()`` disables all."""

    hflip: bool = setting(True, "Random horizontal flips.")
    vflip: bool = setting(True, "Random vertical flips.")
    rot90: bool = setting(True, "Random quarter turns (square tiles).")
    brightness: float = setting(0.1, "Largest brightness shift, in band standard deviations.", ge=0)
    contrast: float = setting(0.2, "Largest log contrast change about the band mean.", ge=0)
    hue: float = setting(0.05, "Largest hue rotation, in turns (RGB only).", ge=0)
    crop_scale: float = setting(0.0, "Largest share cropped away before resizing back.", ge=0, lt=1)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(
            hflip=False, vflip=False, rot90=False, brightness=0, contrast=0, hue=0, crop_scale=0
        )

    @property
    def active(self) -> bool:
        """True when any augmentation would change a batch."""
        return self != AugmentConfig.off()


@dataclass(frozen=True)
class Photometry:
    """Where each band lies in model input space: its training mean (``center``) and one
    standard deviation (``spread``); ``rgb`` when hue rotation applies (3 bands by scale)."""

    center: np.ndarray
    spread: np.ndarray
    rgb: bool = False

    @classmethod
    def of(cls, card: ModelCard) -> Photometry:
        """The photometry of a model card's rule and statistics (unit bands without stats)."""
        c = card.channels
        if card.stats is None:
            return cls(np.full(c, 0.5, np.float32), np.full(c, 0.25, np.float32), c == 3)
        mean = np.asarray(card.stats.mean, np.float32)
        center = card.normalize_pixels(mean[None])[0]
        spread = card.normalize_pixels((mean + np.asarray(card.stats.std, np.float32))[None])[0]
        rgb = c == 3 and card.normalize == "scale"
        return cls(center, np.maximum(spread - center, 1e-6).astype(np.float32), rgb)


def augment_batch(
    images: np.ndarray,
    masks: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
    photometry: Photometry | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch; returns new arrays with the shapes of the inputs. ``valid`` (B, H, W)
    marks the pixels that are data: the others stay 0 after photometric changes."""
    if not config.active:
        return images, masks
    images, masks = images.copy(), masks.copy()
    valid = np.ones(masks.shape, bool) if valid is None else valid.copy()
    for i in range(len(images)):
        images[i], masks[i], valid[i] = _geometric(images[i], masks[i], valid[i], config, rng)
    c = images.shape[-1]
    default = Photometry(np.zeros(c, np.float32), np.ones(c, np.float32), c == 3)
    images = _photometric(images, config, photometry or default, rng)
    return np.where(valid[..., None], images, np.float32(0)), masks


def _geometric(
    image: np.ndarray,
    mask: np.ndarray,
    valid: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if config.hflip and rng.random() < 0.5:
        image, mask, valid = image[:, ::-1], mask[:, ::-1], valid[:, ::-1]
    if config.vflip and rng.random() < 0.5:
        image, mask, valid = image[::-1], mask[::-1], valid[::-1]
    if config.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(0, 4))
        image, mask, valid = np.rot90(image, k), np.rot90(mask, k), np.rot90(valid, k)
    if config.crop_scale > 0 and rng.random() < 0.5:
        scale = 1.0 - rng.random() * config.crop_scale
        image, (mask, valid) = crop_resize(image, (mask, valid), scale, rng)
    return image, mask, valid


def crop_resize(
    image: np.ndarray, masks: tuple[np.ndarray, ...], scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Crop a random window of ``scale`` × the side and resize it back (image bilinear, each of
    ``masks`` nearest)."""
    h, w = masks[0].shape
    ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    ys = y0 + (np.arange(h) + 0.5) * ch / h - 0.5
    xs = x0 + (np.arange(w) + 0.5) * cw / w - 0.5
    near_y = np.clip(np.rint(ys), y0, y0 + ch - 1).astype(int)
    near_x = np.clip(np.rint(xs), x0, x0 + cw - 1).astype(int)
    return _bilinear(image, ys, xs), tuple(m[near_y[:, None], near_x[None, :]] for m in masks)


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.clip(y0 + 1, 0, h - 1), np.clip(x0 + 1, 0, w - 1)
    fy = np.clip(ys - y0, 0, 1)[:, None, None]
    fx = np.clip(xs - x0, 0, 1)[None, :, None]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(image.dtype)


# Rotation about the grey axis in YIQ space: a hue shift that is one matrix product.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def _hue_matrix(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def _photometric(
    images: np.ndarray, config: AugmentConfig, photometry: Photometry, rng: np.random.Generator
) -> np.ndarray:
    n, c = len(images), images.shape[-1]
    if config.hue > 0 and photometry.rgb:
        for i, angle in enumerate(rng.uniform(-1, 1, n) * config.hue * 2 * np.pi):
            images[i] = images[i] @ _hue_matrix(angle).T
    center = photometry.center.reshape(1, 1, 1, c)
    if config.contrast > 0:
        factor = np.exp(rng.uniform(-config.contrast, config.contrast, (n, 1, 1, c)))
        images = center + (images - center) * factor.astype(np.float32)
    if config.brightness > 0:
        shift = rng.uniform(-config.brightness, config.brightness, (n, 1, 1, c))
        images = images + (shift * photometry.spread.reshape(1, 1, 1, c)).astype(np.float32)
    return images.astype(np.float32)
