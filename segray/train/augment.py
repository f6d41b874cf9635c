"""Image + mask augmentations for training, applied identically to both, on numpy batches.

Geometric changes (flips, rot90, crop-resize) move the image and the mask together, the mask with
nearest-neighbour sampling so no new class ids appear; radiometric changes (brightness, gamma, hue)
touch the image only. Works on float32 images in [0, 1] of shape (B, H, W, C).
"""

from __future__ import annotations

import numpy as np

from segray.settings import Settings, setting


class AugmentConfig(Settings):
    """Which augmentations run, and how strong they are; ``AugmentConfig.off()`` disables all."""

    hflip: bool = setting(True, "Random horizontal flips.")
    vflip: bool = setting(True, "Random vertical flips.")
    rot90: bool = setting(True, "Random quarter turns (square tiles).")
    brightness: float = setting(0.1, "Largest brightness shift.", ge=0)
    gamma: float = setting(0.2, "Largest log-gamma change.", ge=0)
    hue: float = setting(0.05, "Largest hue rotation, in turns (RGB only).", ge=0)
    crop_scale: float = setting(0.0, "Largest share cropped away before resizing back.", ge=0, lt=1)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(
            hflip=False, vflip=False, rot90=False, brightness=0, gamma=0, hue=0, crop_scale=0
        )

    @property
    def active(self) -> bool:
        """True when any augmentation would change a batch."""
        return self != AugmentConfig.off()


def augment_batch(
    images: np.ndarray, masks: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch; returns new arrays with the shapes of the inputs."""
    if not config.active:
        return images, masks
    images, masks = images.copy(), masks.copy()
    for i in range(len(images)):
        images[i], masks[i] = _geometric(images[i], masks[i], config, rng)
    return _radiometric(images, config, rng), masks


def _geometric(
    image: np.ndarray, mask: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if config.hflip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if config.vflip and rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if config.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(0, 4))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    if config.crop_scale > 0 and rng.random() < 0.5:
        image, mask = crop_resize(image, mask, 1.0 - rng.random() * config.crop_scale, rng)
    return image, mask


def crop_resize(
    image: np.ndarray, mask: np.ndarray, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a random window of ``scale`` × the side and resize it back (image bilinear, mask
    nearest)."""
    h, w = mask.shape
    ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    ys = y0 + (np.arange(h) + 0.5) * ch / h - 0.5
    xs = x0 + (np.arange(w) + 0.5) * cw / w - 0.5
    near_y = np.clip(np.rint(ys), y0, y0 + ch - 1).astype(int)
    near_x = np.clip(np.rint(xs), x0, x0 + cw - 1).astype(int)
    return _bilinear(image, ys, xs), mask[near_y[:, None], near_x[None, :]]


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


def _radiometric(images: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    n = len(images)
    if config.hue > 0 and images.shape[-1] >= 3:
        for i, angle in enumerate(rng.uniform(-1, 1, n) * config.hue * 2 * np.pi):
            images[i, ..., :3] = images[i, ..., :3] @ _hue_matrix(angle).T
    if config.brightness > 0:
        shift = rng.uniform(-config.brightness, config.brightness, (n, 1, 1, 1))
        images = images + shift.astype(np.float32)
    if config.gamma > 0:
        gamma = np.exp(rng.uniform(-config.gamma, config.gamma, (n, 1, 1, 1))).astype(np.float32)
        images = np.clip(images, 0.0, 1.0) ** gamma
    return np.clip(images, 0.0, 1.0).astype(np.float32)
