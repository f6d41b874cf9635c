"""A vector layer scored against label polygons object by object (the SpaceNet metric).

A predicted polygon and a label polygon of the same class are a match when their IoU is at least
``iou`` (0.5); pairs are taken greedily from the highest IoU down, each polygon in one pair at
most. Precision is matches over predictions, recall matches over labels, F1 their harmonic mean.
Labels are reprojected to the layer's CRS; the layer is read with pyarrow (GeoParquet) or
pyogrio (any other format).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segray.errors import DatasetError
from segray.io import storage
from segray.io.vectors import Features, read_features


def read_layer(uri: str, endpoint: str | None = None) -> Features:
    """A vector layer segray wrote (or any polygons): its geometries, ``class_id`` and CRS."""
    if not uri.lower().endswith((".parquet", ".geoparquet")):
        return read_features(uri, storage.filesystem(uri, endpoint), class_field="class_id")
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri, endpoint=endpoint)))
        geo = json.loads(table.schema.metadata[b"geo"])
        column = geo["primary_column"]
        geoms = shapely.from_wkb(table.column(column).to_numpy(False))
        classes = table.column("class_id").to_numpy().astype(np.uint8)
    except storage.StorageError as exc:
        raise DatasetError(f"{uri}: cannot read the layer: {exc}") from exc
    except Exception as exc:  # pyarrow's and json's errors: the file is not a GeoParquet
        raise DatasetError(f"{uri}: not a GeoParquet layer with class_id ({exc})") from exc
    crs = geo["columns"][column].get("crs", "EPSG:4326")
    if isinstance(crs, dict):
        from pyproj import CRS

        crs = CRS.from_json_dict(crs).to_string()
    return Features(uri, geoms, classes, crs)


def object_scores(
    predicted: Features, truth: Features, iou: float = 0.5, class_id: int | None = None
) -> dict[str, Any]:
    """Matches, precision, recall and F1 of ``predicted`` against ``truth`` (one class, or
    every class the labels have), and the mean IoU of the matches."""
    import shapely

    truth_geoms = truth.geometries
    if truth.crs and predicted.crs and truth.crs != predicted.crs:
        from pyproj import Transformer

        t = Transformer.from_crs(truth.crs, predicted.crs, always_xy=True)
        truth_geoms = shapely.transform(
            truth_geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1]))
        )
    classes = [class_id] if class_id is not None else sorted(set(truth.classes.tolist()))
    tp = n_pred = n_true = 0
    ious: list[float] = []
    for c in classes:
        pred = predicted.geometries[predicted.classes == c]
        true = truth_geoms[truth.classes == c]
        matched = _match(pred, true, iou)
        tp, n_pred, n_true = tp + len(matched), n_pred + len(pred), n_true + len(true)
        ious += matched
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_true if n_true else float("nan")
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else float("nan")
    return {
        "iou_threshold": iou,
        "classes": classes,
        "predicted": n_pred,
        "labels": n_true,
        "matches": tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_match_iou": float(np.mean(ious)) if ious else float("nan"),
    }


def _match(pred: np.ndarray, true: np.ndarray, threshold: float) -> list[float]:
    """Greedy one-to-one matches at IoU ≥ ``threshold``, highest first: their IoUs."""
    import shapely

    if not len(pred) or not len(true):
        return []
    left, right = shapely.STRtree(true).query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[left], true[right]))
    union = shapely.area(pred[left]) + shapely.area(true[right]) - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1e-30), 0.0)
    used_p, used_t, out = set(), set(), []
    for k in np.argsort(-ious, kind="stable"):
        if ious[k] < threshold:
            break
        p, t = int(left[k]), int(right[k])
        if p not in used_p and t not in used_t:
            used_p.add(p), used_t.add(t)
            out.append(float(ious[k]))
    return out
