"""The one way from decoded tiles to masks: a :class:`Segmenter` holds a model, its card and the
window, blend, batch and test-time augmentation settings, and every path calls it.

Bulk tiles and scenes (:mod:`segray.bulk.predictor`), ``/v1/segment`` and map tiles
(:mod:`segray.serve`) and ``segray eval`` go through the same four steps:

1. :meth:`Segmenter.check` — a file's header against the card (size, bands, pixel type), the one
   refusal policy, before any pixel is decoded;
2. :meth:`Segmenter.prepare` — a tile to model input as training saw it (bands, no data,
   normalisation), cut into model-sized :class:`Windows`;
3. :meth:`Segmenter.run` — the windows of many images in few model calls (with test-time
   augmentation or Monte-Carlo dropout), then :meth:`Segmenter.join` — an image's logits,
   stitched, NaN where its pixels were no data;
4. :meth:`Segmenter.finish` — logits to the mask asked for and its side outputs (class ids,
   fractions, confidence, uncertainty).

:meth:`Segmenter.segment` does all four in process. A server that batches model calls across
requests (Serve) runs step 3's model calls itself and hands the logits back to :meth:`join`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.errors import ConfigError, TileError
from segray.inference import run as running
from segray.inference.render import (
    class_fractions,
    mark_nodata,
    render_confidence,
    render_outputs,
    render_uncertainty,
)
from segray.inference.render import render as render_masks
from segray.inference.tiling import BLEND, OVERLAP, Layout, cut_windows, join_windows
from segray.io import imagery

if TYPE_CHECKING:
    from segray.io.files import FileSystem
    from segray.io.grids import RasterHeader
    from segray.io.imagery import Tile
    from segray.models.card import ModelCard


@dataclass(frozen=True)
class Windows:
    """A prepared image: its model-sized windows (n, h, w, C) float32, where they lie, and the
    decoded tile they come from (its georeference, and the map of its pixels that are data)."""

    stack: np.ndarray
    layout: Layout
    tile: Tile

    @property
    def valid(self) -> np.ndarray | None:
        return self.tile.valid


@dataclass(frozen=True)
class Masks:
    """What one image's logits give: the ``mask`` asked for (uint8), the class-id mask at the
    same threshold (``labels``, the same array when the mask is one), each class's share of the
    data pixels, and, where asked, the ``confidence`` of each pixel's class and the
    ``uncertainty`` (both uint8 0..254)."""

    mask: np.ndarray
    labels: np.ndarray
    fractions: list[float]
    confidence: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


class Segmenter:
    """A model and its card with the settings of every path: ``overlap`` and ``blend`` of the
    windows of an image of another size than the model's input, ``batch_size`` windows per
    model call, ``tta`` (:mod:`segray.inference.tta`), ``mc_samples`` Monte-Carlo dropout passes
    (the uncertainty then travels as the logits' last channel), and ``nodata``, the pixel value
    that is no data where a file sets none (default: the card's).

    A Segmenter without a ``model`` checks and finishes only: a scene's driver stitches logits
    made by Predictor actors and renders them with it.
    """

    def __init__(
        self,
        model: Any,
        card: ModelCard,
        *,
        overlap: int = OVERLAP,
        blend: str = BLEND,
        batch_size: int = running.BATCH_SIZE,
        tta: str = "none",
        mc_samples: int = 0,
        nodata: float | None = None,
    ) -> None:
        self.model, self.card = model, card
        self.overlap, self.blend, self.batch_size = overlap, blend, batch_size
        self.tta, self.mc_samples, self.nodata = tta, mc_samples, nodata
        self.window = running.model_window(model) if model is not None else None

    @classmethod
    def load(
        cls,
        uri: str,
        fs: FileSystem | None = None,
        card: ModelCard | None = None,
        precision: str | None = None,
        runtime: str = "keras",
        **settings: Any,
    ) -> Segmenter:
        """The model at ``uri`` (``card``: its card, read already) loaded for inference in
        ``precision`` (default: the card's) by ``runtime`` (keras, or onnx: its ONNX export in
        ONNX Runtime, :mod:`segray.inference.onnx`); Monte-Carlo dropout switched on once when
        ``mc_samples`` asks for it (each switch recompiles the model's predict function)."""
        if runtime == "onnx" and settings.get("mc_samples"):
            raise ConfigError("--mc-samples needs the dropout of --runtime keras; onnx has none")
        model, card = running.load(uri, fs, card, precision, runtime)
        if settings.get("mc_samples"):
            from segray.models.layers import set_monte_carlo  # imports Keras: after load

            set_monte_carlo(model, True)
        return cls(model, card, **settings)

    # --- 1. the header ---------------------------------------------------------------------

    def check(
        self,
        head: RasterHeader,
        max_pixels: int,
        bands: Sequence[int] | None = None,
        source: str | None = None,
    ) -> None:
        """Refuse from ``head`` alone what the model cannot take: more than ``max_pixels``, a
        band selection (``bands``, else the card's) the file lacks, another band count than the
        model's, another pixel type than it was trained on. Raises :class:`TileError`."""
        source = source or head.uri
        imagery.check_header(source, head.width, head.height, head.count, head.dtype, max_pixels)
        bands = bands or self.card.bands
        if bands:
            imagery.check_band_selection(bands, head.count, source)
        elif head.count != self.card.channels:
            reason = (
                f"has {head.count} band(s) but the model expects {self.card.channels}; "
                "select bands with --bands"
            )
            raise TileError(source, reason, "bands")
        running.check_pixel_type(head.dtype, self.card, source)

    # --- 2. model input --------------------------------------------------------------------

    def prepare(self, tile: Tile) -> Windows:
        """``tile`` as the model's input (:func:`segray.inference.run.prepare`: bands, no data,
        normalisation by the card), cut into windows of the model's size. Raises
        :class:`TileError` for a tile the model cannot take."""
        array = running.prepare(tile, self.card, self.nodata)
        stack, layout = cut_windows(array, self.window, self.overlap)
        return Windows(stack, layout, tile)

    # --- 3. the model ----------------------------------------------------------------------

    def run(self, stacks: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """Logits of many window stacks, those of one shape in shared calls; a shape group
        that fails gives each of its stacks the exception, so one bad image spoils no other."""
        if self.model is None:
            raise RuntimeError("this Segmenter has no model: it checks and finishes only")
        return running.infer_stacks(
            self.model,
            stacks,
            self.card,
            self.batch_size,
            mc_samples=self.mc_samples,
            tta=self.tta,
        )

    def join(self, windows: Windows, logits: np.ndarray) -> np.ndarray:
        """An image's logits (H, W, K) from its windows' logits, NaN where it was no data."""
        joined = join_windows(logits, windows.layout, self.blend)
        return mark_nodata(joined, windows.valid)

    def logits(self, tiles: Sequence[Tile]) -> list[np.ndarray | Exception]:
        """Each tile's joined logits (:meth:`join`), or the error that stopped it."""
        prepared: list[Windows | Exception] = []
        for tile in tiles:
            try:
                prepared.append(self.prepare(tile))
            except TileError as exc:
                prepared.append(exc)
        ready = [p for p in prepared if isinstance(p, Windows)]
        results = iter(self.run([p.stack for p in ready]))
        out: list[np.ndarray | Exception] = []
        for p in prepared:
            if isinstance(p, Exception):
                out.append(p)
                continue
            result = next(results)
            out.append(result if isinstance(result, Exception) else self.join(p, result))
        return out

    # --- 4. masks --------------------------------------------------------------------------

    def render(
        self,
        logits: np.ndarray,
        output: str = "classes",
        class_index: int = 1,
        threshold: float | None = None,
    ) -> np.ndarray:
        """uint8 masks (B, H, W) of logits (B, H, W, K) (:func:`segray.inference.render`)."""
        return render_masks(logits, self.card, output, class_index, threshold)

    def finish(
        self,
        logits: np.ndarray,
        output: str = "classes",
        class_index: int = 1,
        threshold: float | None = None,
        confidence: bool = False,
    ) -> list[Masks]:
        """The :class:`Masks` of each image of logits (B, H, W, K), one more channel, last,
        when ``mc_samples`` made an uncertainty; ``confidence``: each pixel's class
        probability too (the vector layer's score)."""
        logits = np.asarray(logits)
        uncertainty = None
        if self.mc_samples:
            logits, entropy = logits[..., :-1], logits[..., -1]
            uncertainty = render_uncertainty(entropy)
        masks, labels = render_outputs(logits, self.card, output, class_index, threshold)
        k = self.card.num_classes
        return [
            Masks(
                mask=masks[j],
                labels=labels[j],
                fractions=class_fractions(labels[j], k),
                confidence=render_confidence(logits[j], labels[j]) if confidence else None,
                uncertainty=None if uncertainty is None else uncertainty[j],
            )
            for j in range(len(logits))
        ]

    def segment(self, tiles: Sequence[Tile], **options: Any) -> list[Masks | Exception]:
        """Every step in process: each tile's :class:`Masks` (``options`` as :meth:`finish`
        takes them), or the error that stopped it."""
        out: list[Masks | Exception] = []
        for result in self.logits(tiles):
            done = isinstance(result, Exception)
            out.append(result if done else self.finish(result[None], **options)[0])
        return out
