"""Pictures and tables people look at: overlays of image | truth | prediction, summaries.

Colour follows the collection's palette, so the same class has the same colour in every picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segray.inference.render import PALETTE


def colourise(mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 picture of a class mask."""
    table = np.asarray(palette or PALETTE, dtype=np.uint8)
    if int(mask.max(initial=0)) >= len(table):
        extra = np.random.default_rng(0).integers(0, 256, (256 - len(table), 3), dtype=np.uint8)
        table = np.concatenate([table, extra])
    return table[mask]


def display_rgb(image: np.ndarray) -> np.ndarray:
    """The first three bands of an image as displayable uint8 RGB (grey for one band)."""
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    rgb = image[..., :3]
    if rgb.dtype != np.uint8:
        lo, hi = np.percentile(rgb, (2, 98))
        rgb = np.clip((rgb - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return rgb


def overlay_grid(
    rows: Sequence[Sequence[np.ndarray]],
    palette: Sequence[Sequence[int]] | None = None,
    gap: int = 2,
) -> np.ndarray:
    """Tile rows of (image, mask, mask, …) into one RGB picture: image | truth | prediction.

    The first entry of a row is an image (H, W, C); the others are class masks (H, W).
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    panels = [[display_rgb(row[0])] + [colourise(m, palette) for m in row[1:]] for row in rows]
    h, w = panels[0][0].shape[:2]
    ncols = max(len(p) for p in panels)
    out = np.full((len(panels) * (h + gap) - gap, ncols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = panel
    return out


#: Smallest side of each panel of an overlay, in pixels: small tiles are enlarged to it.
PANEL_PIXELS = 256


def overlay_png(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    names: Sequence[str],
    palette: Sequence[Sequence[int]] | None = None,
) -> bytes:
    """A PNG of image | truth | prediction, each panel at least :data:`PANEL_PIXELS` on its
    shorter side (enlarged pixel for pixel, never smoothed), with a legend of the class colours."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    table = np.asarray(palette or PALETTE, dtype=np.uint8)
    h, w = truth.shape[:2]
    scale = max(1, -(-PANEL_PIXELS // min(h, w)))
    dpi = 100
    panel = (w * scale / dpi, h * scale / dpi)
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel[0] + 0.6, panel[1] + 1.2), dpi=dpi)
    pictures = (display_rgb(image), colourise(truth, palette), colourise(prediction, palette))
    for ax, picture, title in zip(axes, pictures, ("image", "truth", "prediction"), strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    present = sorted(set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist()))
    handles = [
        Patch(color=table[c % len(table)] / 255, label=names[c] if c < len(names) else str(c))
        for c in present
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def confusion_heatmap(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    """A PNG heatmap of a confusion matrix, rows normalised to recall, with the counts written."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.5), dpi=100)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    for i in range(n):
        for j in range(n):
            colour = "white" if rows[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{rows[i, j]:.2f}\n{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color=colour,
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
