"""``segray eval``: a trained model against labelled tiles — numbers, a heatmap, the worst tiles.

Predictions come from the shared path (:mod:`segray.inference`), scores from
:mod:`segray.metrics`, so a report's IoU is the number training and bulk prediction would
compute for the same masks.
Writes ``report.json``, ``report.md``, ``confusion.png`` and ``worst/<id>.png`` overlays
(image | truth | prediction) under the output folder.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import model_validator

from segray.datasets.labels import Layout
from segray.inference.run import BATCH_SIZE
from segray.inference.tta import HELP as TTA_HELP
from segray.inference.tta import TTA
from segray.io import imagery, storage
from segray.log import progress
from segray.models.precision import Precision
from segray.settings import Settings, setting


class EvalConfig(Settings, storage.Addressed):
    """What to evaluate, on what, and where the report goes."""

    model: str = setting("", "Run folder or model.keras (local or s3://).")
    vectors: str | None = setting(
        None, "Score this vector layer against --labels polygons object by object instead."
    )
    iou: float = setting(0.5, "IoU at which a polygon matches a label (--vectors).", gt=0, le=1)
    data: str = setting("", "Labelled collection (any --layout; or --stac).")
    out: str | None = setting(None, "Report folder (default: <model>/eval).")
    layout: Layout = setting("paired", "How images and labels are laid out.")
    labels: str | None = setting(None, "One vector file labelling every scene (layout scenes).")
    class_field: str | None = setting(None, "Vector attribute holding class ids (default: 1).")
    stac: str | None = setting(None, "STAC file of scenes (layout scenes).")
    asset: str | None = setting(None, "The STAC items' image asset.")
    held_out: bool = setting(
        False, "Layout scenes: only the chips the training run held out (from its config.yaml)."
    )
    worst: int = setting(4, "Overlays of the k worst tiles.", ge=0)
    batch_size: int = setting(BATCH_SIZE, "Windows per model call.", ge=1)
    tta: TTA = setting("none", TTA_HELP)
    precision: Precision | None = setting(
        None, "Arithmetic of the model: fp32, bf16 or fp16 (default: the card's, as trained)."
    )
    palette: str | None = setting(None, "Palette JSON for --layout palette.")
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")
    limit: int | None = setting(None, "Use only the first N tiles.", ge=1, cli=False)

    @property
    def report_folder(self) -> str:
        """Where the report goes: ``out``, else ``<model>/eval`` (``<layer>.eval`` for a layer)."""
        if self.out:
            return self.out
        return f"{self.vectors}.eval" if self.vectors else storage.join(self.model, "eval")

    @model_validator(mode="after")
    def _what(self) -> EvalConfig:
        if not (self.model or self.vectors):
            raise ValueError("give model (to score a model) or vectors (to score a layer)")
        if self.vectors and not self.labels:
            raise ValueError("vectors is scored against label polygons: give labels too")
        return self


def evaluate_layer(config: EvalConfig) -> dict[str, Any]:
    """Object-level precision, recall and F1 of ``config.vectors`` against ``config.labels``
    (:mod:`.objects`); writes and returns ``report.json``."""
    from segray.evaluate import objects
    from segray.io.vectors import read_features

    layer = objects.read_layer(str(config.vectors), config.endpoint)
    labels = str(config.labels)
    truth = read_features(labels, config.fs(labels), class_field=config.class_field)
    class_id = None if config.class_field else 1
    doc: dict[str, Any] = {"layer_uri": config.vectors, "labels_uri": labels}
    doc |= objects.object_scores(layer, truth, config.iou, class_id)
    uri = storage.join(config.report_folder, "report.json")
    config.fs(uri).write_text(uri, json.dumps(doc, indent=1))
    return doc


def layer_summary(doc: dict[str, Any]) -> str:
    """One line of a layer's object scores."""
    keys = ("predicted", "labels", "matches", "precision", "recall", "f1")
    values = (f"{doc[k]:.3f}" if isinstance(doc[k], float) else str(doc[k]) for k in keys)
    return f"objects at IoU >= {doc['iou_threshold']}: " + ", ".join(
        f"{k} {v}" for k, v in zip(keys, values, strict=True)
    )


def _tile_score(cm: Any) -> float:
    from segray import metrics

    value = metrics.mean_iou(cm)
    return 1.0 if np.isnan(value) else float(value)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score the model on every tile of ``config.data``; write and return the report."""
    from segray import metrics
    from segray.datasets import labels
    from segray.inference import run

    model, card = run.load(config.model, config.fs(config.model), precision=config.precision)
    spec = labels.DatasetSpec(
        root=config.data,
        layout=config.layout,
        num_classes=card.num_classes,
        bands=card.bands,
        palette=config.palette,
        endpoint=config.endpoint,
        limit=config.limit,
        val_fraction=0.0,
        nodata=card.nodata,
        ignore_index=255 if card.ignore_index is None else card.ignore_index,
    )
    if config.layout == "scenes":
        items, load = _scene_chips(config, spec, card)
    else:
        items = labels.find_samples(spec)
        load = lambda sample: labels.load_sample(sample, spec)  # noqa: E731
    total = metrics.ConfusionMatrix(card.num_classes, class_names=card.names())
    scored: list[tuple[float, str, dict[str, Any]]] = []
    with progress(len(items), "evaluating", "tile") as bar:
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            rows = [load(item) for item in batch]
            preds = predict_rows(model, card, rows, config.batch_size, config.tta)
            for row, pred in zip(rows, preds, strict=True):
                cm = metrics.ConfusionMatrix(card.num_classes).update(row["mask"], pred)
                total.merge(cm)
                scored.append((_tile_score(cm.matrix), row["id"], {**row, "pred": pred}))
            bar.update(len(batch))
    scored.sort(key=lambda t: t[0])
    return _write_report(config, card, total, scored)


def _scene_chips(config: EvalConfig, spec: Any, card: Any) -> tuple[list, Any]:
    """The chips of the scenes to score and how to read one: a grid over every scene, or with
    ``held_out`` the validation grid of the training run (its split rebuilt from config.yaml)."""
    from segray.datasets import chips, sampling

    size = int(card.input_shape[0])
    spec = spec.replace(
        root=config.data or config.stac or "",
        size=size,
        labels=config.labels,
        class_field=config.class_field,
        stac=config.stac,
        asset=config.asset,
    )
    if config.held_out:
        run = _run_settings(config)
        keys = ("val_fraction", "seed", "val_split", "block_size")
        spec = spec.replace(**{k: run[k] for k in keys if k in run})
    scenes = chips.find_scenes(spec)
    grid = sampling.split(scenes, spec).val_chips if config.held_out else None
    if grid is None:
        grid = sampling.scene_grid(scenes, size)
    return grid, lambda chip: chips.read_chip(scenes[chip.scene], chip, size, spec)


def _run_settings(config: EvalConfig) -> dict[str, Any]:
    """The training run's settings: ``config.yaml`` of the run folder the model is in."""
    import yaml

    from segray.errors import ConfigError

    folder = config.model.rsplit("/", 1)[0] if config.model.endswith(".keras") else config.model
    uri = storage.join(folder, "config.yaml")
    try:
        doc = yaml.safe_load(config.fs(uri).read_text(uri))
    except (storage.StorageError, yaml.YAMLError) as exc:
        raise ConfigError(f"--held-out needs the run's settings: cannot read {uri}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{uri}: expected the run's settings")
    return doc


def predict_rows(
    model: Any,
    card: Any,
    rows: list[dict[str, Any]],
    batch_size: int = BATCH_SIZE,
    tta: str = "none",
) -> list[np.ndarray]:
    """Class masks for decoded rows through the :class:`~segray.inference.segmenter.Segmenter`
    every path takes: prepare, windows of the model's size (any tile size), batched inference
    (with ``tta``), stitch, render."""
    from segray.inference.segmenter import Segmenter

    segmenter = Segmenter(model, card, batch_size=batch_size, tta=tta)
    tiles = [imagery.Tile(r["image"], r["id"], valid=r.get("valid")) for r in rows]
    masks = []
    for result in segmenter.segment(tiles):
        if isinstance(result, Exception):
            raise result
        masks.append(result.mask)
    return masks


def _write_report(config: EvalConfig, card: Any, total: Any, scored: list) -> dict[str, Any]:
    from segray.evaluate import report

    out = config.fs(config.report_folder)
    worst = []
    for score, tile_id, row in scored[: config.worst]:
        uri = storage.join(config.report_folder, "worst", f"{tile_id}.png")
        picture = report.overlay_png(row["image"], row["mask"], row["pred"], card.names())
        out.write_bytes(uri, picture)
        worst.append({"id": tile_id, "mean_iou": score, "overlay": uri})
    heatmap = storage.join(config.report_folder, "confusion.png")
    out.write_bytes(heatmap, report.confusion_heatmap(total.matrix, card.names()))
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
    out.write_text(storage.join(config.report_folder, "report.json"), json.dumps(doc, indent=2))
    report_md = storage.join(config.report_folder, "report.md")
    out.write_text(report_md, _markdown(doc, total))
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
