"""Large scenes as overlapping windows: where the windows lie, how to read one, and stitching.

A scene of any size is cut into windows (a side, or a height and width) that overlap by at least
``overlap`` pixels; the last row and column of windows are flush with the scene's edge. Window
predictions (logits) are put back together by :class:`SceneStitcher`, either by centre-crop
(``crop``: each pixel from the window owning it, cuts in the middle of each overlap) or by
weighted blending (``linear``/``cosine``: weights ramp up from a window's inner edges over
``overlap`` pixels). All are exact for a field every window agrees on; centre-crop reproduces a
fully convolutional model's whole-scene output exactly once ``overlap`` is at least twice the
model's receptive radius and window starts fall on its pooling grid.

:func:`cut_windows` and :func:`join_windows` are the one windowing of an in-memory image of
another size than the model's input, for bulk tiles and Serve alike, so both give the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from segray.io.rasters import Window

Blend = Literal["linear", "cosine", "crop"]
BLENDS: tuple[str, ...] = get_args(Blend)
#: Default overlap (pixels) and blend of windows, for scenes and odd-sized images, bulk and Serve.
OVERLAP = 64
BLEND = "cosine"


def axis_starts(size: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``window - overlap``, the last flush with the edge."""
    _check_geometry(size, window, overlap)
    if size <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


def scene_windows(
    height: int, width: int, window: int | tuple[int, int], overlap: int
) -> list[Window]:
    """Windows covering a ``height`` x ``width`` scene, row-major, overlapping by >= ``overlap``.

    ``window`` is a side or a ``(height, width)`` pair; windows are clipped to a smaller scene.
    """
    wh, ww = window_size(window)
    rows, cols = axis_starts(height, wh, overlap), axis_starts(width, ww, overlap)
    return [Window(r, c, min(wh, height), min(ww, width)) for r in rows for c in cols]


def default_overlap(window: int | Sequence[int]) -> int:
    """The overlap where none is given: :data:`OVERLAP`, at most half the window (so every model
    size has a default that works)."""
    return min(OVERLAP, min(window_size(window)) // 2)


def window_size(window: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a window given as one side or a pair."""
    if isinstance(window, int | np.integer):
        return int(window), int(window)
    wh, ww = window
    return int(wh), int(ww)


def _check_geometry(size: int, window: int, overlap: int) -> None:
    if size < 1:
        raise ValueError(f"scene size must be >= 1 pixel; got {size}")
    if window < 1:
        raise ValueError(f"window must be >= 1 pixel; got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must lie in 0..window-1 ({window - 1}); got {overlap}")


def axis_weights(size: int, window: int, overlap: int, blend: str = "cosine") -> list[np.ndarray]:
    """1-D weights of each window along one axis (same order as :func:`axis_starts`).

    ``crop``: 1 on the part of the window it owns (cuts at the middle of each overlap), else 0.
    ``linear``/``cosine``: a ramp from the window's inner edges over ``overlap`` pixels, strictly
    positive everywhere, flat (1) towards the scene's own edges.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}; got {blend!r}")
    starts = axis_starts(size, window, overlap)
    length = min(window, size)
    if blend == "crop":
        cuts = [(b + a + length) // 2 for a, b in zip(starts, starts[1:], strict=False)]
        bounds = list(zip([0, *cuts], [*cuts, size], strict=True))
        return [_owned(length, s, lo, hi) for s, (lo, hi) in zip(starts, bounds, strict=True)]
    return [_ramp(length, s, size, overlap, blend) for s in starts]


def _owned(length: int, start: int, lo: int, hi: int) -> np.ndarray:
    weights = np.zeros(length, np.float32)
    weights[lo - start : hi - start] = 1.0
    return weights


def _ramp(length: int, start: int, size: int, overlap: int, blend: str) -> np.ndarray:
    position = np.arange(length, dtype=np.float64)
    lead = position if start > 0 else np.full(length, np.inf)
    trail = length - 1 - position if start + length < size else np.full(length, np.inf)
    t = np.clip((np.minimum(lead, trail) + 1.0) / (overlap + 1.0), 0.0, 1.0)
    if blend == "cosine":
        t = 0.5 - 0.5 * np.cos(np.pi * t)
    return t.astype(np.float32)


class SceneStitcher:
    """Blends window logits into a scene, row band by row band, to bound memory.

    The scene's rows are cut into bands at every window start and end; a band's weighted sums are
    kept only until every window row covering it has arrived, then the band is handed out
    normalised. Windows may arrive in any order; in row-major order at most about one window row
    of float accumulators (``(window + stride) x width x channels``) is alive at a time.
    """

    def __init__(
        self,
        height: int,
        width: int,
        window: int | tuple[int, int],
        overlap: int,
        blend: str = "cosine",
    ) -> None:
        self.height, self.width = height, width
        wh, ww = window_size(window)
        self.row_starts = axis_starts(height, wh, overlap)
        col_starts = axis_starts(width, ww, overlap)
        row_w = axis_weights(height, wh, overlap, blend)
        self._row_w = dict(zip(self.row_starts, row_w, strict=True))
        col_w = axis_weights(width, ww, overlap, blend)
        self._col_w = dict(zip(col_starts, col_w, strict=True))
        self._length = min(wh, height)
        self._missing = {r: len(col_starts) for r in self.row_starts}
        edges = {0, height} | set(self.row_starts) | {r + self._length for r in self.row_starts}
        self._bands = list(zip(sorted(edges), sorted(edges)[1:], strict=False))
        self._sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def done(self) -> bool:
        """True once every window has been added."""
        return not any(self._missing.values())

    def add(self, window: Window, logits: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add a window's logits (h, w, K); returns the bands ``(first_row, logits)`` now final."""
        if window.row not in self._missing or window.col not in self._col_w:
            raise ValueError(f"{window} is not a window of this scene's grid")
        weights = np.outer(self._row_w[window.row], self._col_w[window.col])
        cols = slice(window.col, window.col + window.width)
        for top, bottom in self._bands:
            if top < window.row or bottom > window.row + window.height:
                continue
            rows = slice(top - window.row, bottom - window.row)
            total, weight = self._band_sums(top, bottom, logits.shape[-1])
            total[:, cols] += logits[rows] * weights[rows, :, None]
            weight[:, cols] += weights[rows]
        self._missing[window.row] -= 1
        return self._finished()

    def _band_sums(self, top: int, bottom: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
        if top not in self._sums:
            shape = (bottom - top, self.width)
            self._sums[top] = (
                np.zeros((*shape, channels), np.float32),
                np.zeros(shape, np.float32),
            )
        return self._sums[top]

    def _finished(self) -> list[tuple[int, np.ndarray]]:
        out = []
        for top, bottom in self._bands:
            covering = [r for r in self.row_starts if r <= top and bottom <= r + self._length]
            if top in self._sums and not any(self._missing[r] for r in covering):
                total, weight = self._sums.pop(top)
                out.append((top, total / weight[..., None]))
        return out


def stitch(
    pieces: Sequence[tuple[Window, np.ndarray]],
    height: int,
    width: int,
    window: int | tuple[int, int],
    overlap: int,
    blend: str = "cosine",
) -> np.ndarray:
    """The stitched scene (H, W, K) from ``(window, logits)`` pairs; for tests and small scenes."""
    stitcher = SceneStitcher(height, width, window, overlap, blend)
    out: np.ndarray | None = None
    for win, logits in pieces:
        for top, band in stitcher.add(win, np.asarray(logits, np.float32)):
            if out is None:
                out = np.zeros((height, width, band.shape[-1]), np.float32)
            out[top : top + band.shape[0]] = band
    if out is None or not stitcher.done:
        raise ValueError("stitch needs every window of the scene")
    return out


# --- in-memory images of any size -------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where :func:`cut_windows` cut an image: its size and its windows on the padded image
    (``window`` None: the image went to the model whole)."""

    height: int
    width: int
    windows: tuple[Window, ...]
    window: tuple[int, int] | None = None
    overlap: int = 0


def cut_windows(
    image: np.ndarray, window: tuple[int, int] | None, overlap: int = OVERLAP
) -> tuple[np.ndarray, Layout]:
    """An (H, W, C) image as a stack (n, h, w, C) of model-sized windows, and their layout.

    An image of the ``window`` size, or of any size when ``window`` is None (a size-flexible
    model), is one window as it is. A smaller image is reflect-padded up to the window; a larger
    one is cut into windows overlapping by ``overlap``, at most half the window.
    """
    h, w = image.shape[:2]
    if window is None or (h, w) == tuple(window):
        return image[None], Layout(h, w, (Window(0, 0, h, w),))
    window = window_size(window)
    overlap = min(overlap, min(window) // 2)
    padded = pad_to(image[None], (max(h, window[0]), max(w, window[1])))[0]
    windows = tuple(scene_windows(*padded.shape[:2], window, overlap))
    stack = np.stack([padded[win.slices] for win in windows])
    return stack, Layout(h, w, windows, window, overlap)


def window_count(
    height: int, width: int, window: tuple[int, int] | None, overlap: int = OVERLAP
) -> int:
    """How many windows :func:`cut_windows` makes of a ``height`` x ``width`` image."""
    if window is None or (height, width) == tuple(window):
        return 1
    wh, ww = window_size(window)
    overlap = min(overlap, min(wh, ww) // 2)
    rows = axis_starts(max(height, wh), wh, overlap)
    cols = axis_starts(max(width, ww), ww, overlap)
    return len(rows) * len(cols)


def join_windows(logits: np.ndarray, layout: Layout, blend: str = BLEND) -> np.ndarray:
    """The image's logits (H, W, K) from its windows' logits (n, h, w, K): stitched, cropped."""
    if layout.window is None:
        return logits[0]
    height, width = max(layout.height, layout.window[0]), max(layout.width, layout.window[1])
    pieces = list(zip(layout.windows, logits, strict=True))
    full = stitch(pieces, height, width, layout.window, layout.overlap, blend)
    return full[: layout.height, : layout.width]


# --- windowed reads ---------------------------------------------------------------------------


def pad_to(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reflect-pad (B, H, W, C) at the bottom and right up to ``size`` (edge-pad when too small
    to reflect)."""
    ph, pw = size[0] - batch.shape[1], size[1] - batch.shape[2]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {batch.shape[1:3]} down to {size}")
    if ph == 0 and pw == 0:
        return batch
    mode = "reflect" if ph < batch.shape[1] and pw < batch.shape[2] else "edge"
    return np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
