"""Labelled tiles checked by Ray tasks: every sample read once, every bad file reported at once, the
set summarised (shapes, pixel type, classes, band statistics), and no pixel kept; training then
streams the samples (:mod:`segray.train.feed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.datasets import stats as band_stats
from segray.datasets.labels import (
    DatasetSpec,
    Sample,
    find_samples,
    load_palette,
    load_sample,
    split_samples,
)
from segray.errors import DatasetError, TileError
from segray.io.bands import BandStats

if TYPE_CHECKING:
    import ray.data


@dataclass
class DatasetInfo:
    """What a scan of the pixels found: counts, shapes, pixel type, classes present (the
    ignored label aside) and the band statistics of the valid pixels."""

    count: int
    image_shape: tuple[int, ...]
    max_class: int
    class_pixels: list[int] = field(default_factory=list)
    dtype: str = "uint8"
    stats: BandStats | None = None
    #: Pixels per class id in the training split alone (None: ``class_pixels`` are all training).
    train_class_pixels: list[int] | None = None

    def training_class_pixels(self) -> list[int]:
        """Pixels per class id in the training split."""
        return list(
            self.class_pixels if self.train_class_pixels is None else self.train_class_pixels
        )

    def class_fractions(self) -> list[float]:
        """Fraction of all mask pixels in each class id."""
        total = max(sum(self.class_pixels), 1)
        return [c / total for c in self.class_pixels]


def _loader(spec: DatasetSpec, palette: np.ndarray | None, per_image: int) -> Any:
    def load(row: dict[str, Any]) -> dict[str, Any]:
        sample = Sample(row["id"], row["image_uri"], tuple(row["label_uris"]))
        try:
            out = load_sample(sample, spec, palette)
        except TileError as exc:
            # Empty arrays of the right rank keep the columns' types; check() reports the error.
            empty = {"image": np.zeros((0, 0, 0), np.uint8), "mask": np.zeros((0, 0), np.uint8)}
            return {
                "id": sample.id,
                **empty,
                "valid": np.zeros((0, 0), bool),
                "error": str(exc),
                "shape": "",
                "dtype": "",
                "hist": _hist(None),
                **_band_parts(None, None, 0),
            }
        image = out["image"]
        out.update(
            error="",
            shape="x".join(map(str, image.shape)),
            dtype=image.dtype.name,
            hist=_hist(out["mask"]),
            **_band_parts(image, out["valid"], per_image, sample.id),
        )
        return out

    return load


def _hist(mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.zeros(256, np.int64)
    return np.bincount(mask.reshape(-1), minlength=256).astype(np.int64)


def _band_parts(
    image: np.ndarray | None, valid: np.ndarray | None, k: int, seed: str = ""
) -> dict[str, Any]:
    """This image's share of the band statistics (:func:`segray.datasets.stats.image_summary`)."""
    if image is None:
        empty = np.zeros(0, np.float64)
        return {
            "band_sums": empty,
            "band_squares": empty,
            "band_count": 0,
            "band_sample": np.zeros((0, 0), np.float32),
        }
    rng = np.random.default_rng(list(seed.encode()) or 0)
    sums, squares, count, sample = band_stats.image_summary(image, valid, k, rng)
    return {"band_sums": sums, "band_squares": squares, "band_count": count, "band_sample": sample}


def to_ray_dataset(samples: Sequence[Sample], spec: DatasetSpec) -> ray.data.Dataset:
    """A lazy Ray Dataset reading and decoding ``samples`` in Ray tasks.

    Rows carry ``error`` ("" when fine), ``shape`` and ``hist`` (class pixel counts) columns
    instead of raising, so one bad file is reported together with all the others by :func:`check`.
    """
    import ray.data

    palette = load_palette(spec) if spec.layout == "palette" else None
    items = [{"id": s.id, "image_uri": s.image, "label_uris": list(s.labels)} for s in samples]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    return ds.map(_loader(spec, palette, band_stats.sample_size(len(items))))


def check(
    ds: ray.data.Dataset, what: str = "dataset", ignore_index: int = 255
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """Read every sample once, raise :class:`DatasetError` listing every bad file, and summarise
    the set, keeping no pixel: only each sample's summary comes back (memory holds the samples in
    flight, whatever the set's size).

    Returns ``ds`` as a lazy dataset of ``{"id", "image", "mask", "valid"}`` rows (read again
    when iterated) and a :class:`DatasetInfo`.
    """
    columns = ["id", "error", "shape", "dtype", "hist"]
    columns += ["band_sums", "band_squares", "band_count", "band_sample"]
    rows = ds.select_columns(columns).take_all()
    if not rows:
        raise DatasetError(f"the {what} is empty")
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError(f"{len(errors)} bad file(s) in the {what}:\n  {shown}{more}")
    for key, fix in (("shape", "set --size"), ("dtype", "convert them to one pixel type")):
        found = sorted({r[key] for r in rows})
        if len(found) > 1:
            first = {v: next(r["id"] for r in rows if r[key] == v) for v in found}
            listed = ", ".join(f"{v} (e.g. {first[v]})" for v in found)
            raise DatasetError(f"images in the {what} differ in {key}: {listed}; {fix}")
    hist = np.sum([r["hist"] for r in rows], axis=0)
    hist[ignore_index] = 0
    sampler = band_stats.StatsSampler()
    for r in rows:
        sampler.add(r["band_sums"], r["band_squares"], r["band_count"], r["band_sample"])
    info = DatasetInfo(
        count=len(rows),
        image_shape=tuple(int(v) for v in rows[0]["shape"].split("x")),
        max_class=int(np.nonzero(hist)[0].max()) if hist.any() else 0,
        class_pixels=[int(v) for v in hist],
        dtype=str(rows[0]["dtype"]),
        stats=sampler.result(f"the {what}") if sampler.pixels else None,
    )
    return ds.select_columns(["id", "image", "mask", "valid"]), info


def load_splits(
    spec: DatasetSpec,
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, DatasetInfo]:
    """Lazy train and validation Ray Datasets for a collection, checked, with a summary of both.

    Raises :class:`DatasetError` naming the files when anything is unpaired, unreadable, of the
    wrong size, or has class ids ≥ ``spec.num_classes``.
    """
    train_s, val_s, info = scan(spec)
    columns = ["id", "image", "mask", "valid"]
    train = to_ray_dataset(train_s, spec).select_columns(columns)
    val = to_ray_dataset(val_s, spec).select_columns(columns) if val_s else None
    return train, val, info


def scan(spec: DatasetSpec) -> tuple[list[Sample], list[Sample], DatasetInfo]:
    """List, pair, split and check a collection (every sample read once, none kept): the
    training and validation samples and a summary of both."""
    samples = find_samples(spec)
    train_s, val_s = split_samples(samples, spec.val_fraction, spec.seed)
    _, info = check(to_ray_dataset(train_s, spec), "training set", spec.ignore_index)
    if val_s:
        info.train_class_pixels = list(info.class_pixels)
        _, val_info = check(to_ray_dataset(val_s, spec), "validation set", spec.ignore_index)
        if val_info.image_shape != info.image_shape:
            raise DatasetError(
                f"training images are {info.image_shape} but validation images are "
                f"{val_info.image_shape}; set --size"
            )
        if val_info.dtype != info.dtype:
            raise DatasetError(
                f"training images are {info.dtype} but validation images are {val_info.dtype}; "
                "convert them to one pixel type"
            )
        info.count += val_info.count
        info.class_pixels = [
            a + b for a, b in zip(info.class_pixels, val_info.class_pixels, strict=True)
        ]
        info.max_class = max(info.max_class, val_info.max_class)
    info.class_pixels = info.class_pixels[: info.max_class + 1]
    if info.train_class_pixels is not None:
        info.train_class_pixels = info.train_class_pixels[: info.max_class + 1]
    return train_s, val_s, info
