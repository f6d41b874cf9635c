"""A tiny model *fitted* for a few seconds on synthetic buildings, saved with its card.

An untrained model's mask is often one class everywhere, so a test that two paths give "the same
mask" with it can pass without either path doing its work. This model's masks follow the
buildings of :func:`segray.devtools.synth.generate_tile`: both classes on most tiles, and
boundaries that move when any step (bands, normalisation, windows, threshold) is done otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segray.devtools import spectra, synth


def fit_unet(
    folder: str,
    size: int = 32,
    bands: int = 3,
    dtype: str = "uint8",
    tiles: int = 32,
    epochs: int = 30,
    seed: int = 0,
) -> str:
    """A binary U-Net fitted on ``tiles`` synthetic tiles of ``size`` px, ``bands`` bands of
    ``dtype`` pixels (:func:`fit_on`). Returns ``folder``."""
    drawn = [
        synth.generate_tile(size, synth.tile_seed(seed, i), "binary", bands, dtype)
        for i in range(tiles)
    ]
    images = np.stack([image for image, _ in drawn])
    masks = np.stack([mask for _, mask in drawn])
    return fit_on(folder, images, masks, epochs=epochs, seed=seed)


def fit_on(
    folder: str,
    images: np.ndarray,
    masks: np.ndarray,
    epochs: int = 30,
    seed: int = 0,
    nodata: float | None = 0,
    class_names: tuple[str, str] = ("background", "building"),
) -> str:
    """A binary U-Net (4 base filters, depth 2) on tiles ``images`` (N, H, W, C) fitted by a
    plain Keras ``fit`` (Adam, BCE over the labelled pixels) to ``masks`` (N, H, W: 1 the class,
    0 not, 255 unlabelled), saved with its card in ``folder``: uint8 tiles scaled, others
    standardised by their statistics (as ``segray train`` writes them); pixels equal to
    ``nodata`` in every band are no data for uint16 and float tiles. Returns ``folder``."""
    import keras

    from segray.datasets import stats as band_stats
    from segray.models import build_model, saving

    dtype = str(images.dtype)
    shape = tuple(int(v) for v in images.shape[1:])
    valid = None if dtype == "uint8" or nodata is None else (images != nodata).any(-1)
    card_fields: dict[str, Any] = {"dtype": dtype, "normalize": "scale"}
    if dtype != "uint8":
        sampler = band_stats.StatsSampler()
        rng = np.random.default_rng(seed)
        for i, image in enumerate(images):
            ok = None if valid is None else valid[i]
            sampler.add(*band_stats.image_summary(image, ok, 512, rng))
        card_fields = {"dtype": dtype, "normalize": "stats", "stats": sampler.result()}
    card = saving.ModelCard(
        name="unet",
        num_classes=2,
        input_shape=shape,
        class_names=list(class_names),
        options={"base_filters": 4, "depth": 2},
        **card_fields,
    )
    x = np.stack(
        [
            card.normalize_pixels(image, None if valid is None else valid[i])
            for i, image in enumerate(images)
        ]
    )
    y = np.where(masks == 1, 1.0, 0.0)[..., None].astype(np.float32)
    weight = (masks != spectra.IGNORE).astype(np.float32)
    keras.utils.set_random_seed(seed)
    model = build_model("unet", 2, shape, base_filters=4, depth=2)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, sample_weight=weight, batch_size=8, epochs=epochs, verbose=0)
    saving.save_model(model, card, folder)
    return folder
