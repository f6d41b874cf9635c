"""``segray eval``: a trained model against labelled tiles — numbers, a heatmap, the worst tiles.

Predictions come from the shared path (:mod:`segray.inference`), scores from :mod:`segray.metrics`,
so a report's IoU is the number training and bulk prediction would compute for the same masks.
Writes ``report.json``, ``report.md``, ``confusion.png`` and ``worst/<id>.png`` overlays
(image | truth | prediction) under the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray import imagery, storage


@dataclass
class EvalConfig:
    """What to evaluate, on what, and where the report goes."""

    model: str
    data: str
    out: str
    layout: str = "paired"
    worst: int = 4
    batch_size: int = 16
    palette: str | None = None
    endpoint: str | None = None
    limit: int | None = None


def _tile_score(cm: Any) -> float:
    from segray import metrics

    value = metrics.mean_iou(cm)
    return 1.0 if np.isnan(value) else float(value)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score the model on every tile of ``config.data``; write and return the report."""
    from segray import datasets, metrics, modelio

    model, card = modelio.load_model(config.model, endpoint=config.endpoint)
    spec = datasets.DatasetSpec(
        config.data,
        config.layout,
        num_classes=card.num_classes,
        bands=card.bands,
        palette=config.palette,
        endpoint=config.endpoint,
        limit=config.limit,
        val_fraction=0.0,
    )
    samples = datasets.find_samples(spec)
    total = metrics.ConfusionMatrix(card.num_classes, class_names=card.names())
    scored: list[tuple[float, str, dict[str, Any]]] = []
    for start in range(0, len(samples), config.batch_size):
        rows = [datasets.load_sample(s, spec) for s in samples[start : start + config.batch_size]]
        for row, pred in zip(rows, predict_rows(model, card, rows), strict=True):
            cm = metrics.ConfusionMatrix(card.num_classes).update(row["mask"], pred)
            total.merge(cm)
            scored.append((_tile_score(cm.matrix), row["id"], {**row, "pred": pred}))
    scored.sort(key=lambda t: t[0])
    return _write_report(config, card, total, scored)


def predict_rows(model: Any, card: Any, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """Class masks for decoded rows through the path bulk prediction takes: prepare, windows of
    the model's size (any tile size), batched inference, stitch, render."""
    from segray import inference, tiling

    images = [inference.prepare(imagery.Tile(r["image"], r["id"]), card) for r in rows]
    masks = []
    for logits in tiling.infer_images(model, images, card):
        if isinstance(logits, Exception):
            raise logits
        masks.append(inference.render(logits[None], card)[0])
    return masks


def _write_report(config: EvalConfig, card: Any, total: Any, scored: list) -> dict[str, Any]:
    from segray import report

    ep = config.endpoint
    worst = []
    for score, tile_id, row in scored[: config.worst]:
        uri = storage.join(config.out, "worst", f"{tile_id}.png")
        picture = report.overlay_grid([(row["image"], row["mask"], row["pred"])])
        storage.write_bytes(uri, imagery.encode_png(picture), endpoint=ep)
        worst.append({"id": tile_id, "mean_iou": score, "overlay": uri})
    heatmap = storage.join(config.out, "confusion.png")
    storage.write_bytes(heatmap, report.confusion_heatmap(total.matrix, card.names()), endpoint=ep)
    doc = {
        "model": config.model,
        "model_version": card.version,
        "data": config.data,
        "tiles": len(scored),
        **total.summary(),
        "confusion_matrix": total.matrix.tolist(),
        "confusion_png": heatmap,
        "worst": worst,
    }
    storage.write_text(
        storage.join(config.out, "report.json"), json.dumps(doc, indent=2), endpoint=ep
    )
    storage.write_text(storage.join(config.out, "report.md"), _markdown(doc, total), endpoint=ep)
    return doc


def _markdown(doc: dict[str, Any], total: Any) -> str:
    lines = [
        f"# Evaluation of `{doc['model']}` (version {doc['model_version']})",
        "",
        f"Data: `{doc['data']}`, {doc['tiles']} tiles.",
        "",
        "```",
        total.table(),
        "```",
        "",
        f"Confusion matrix (rows = truth, columns = prediction): `{doc['confusion_png']}`",
        "",
        "## Worst tiles (image | truth | prediction)",
        "",
    ]
    lines += [
        f"- `{w['id']}`: mean IoU {w['mean_iou']:.3f} — `{w['overlay']}`" for w in doc["worst"]
    ]
    return "\n".join(lines) + "\n"
