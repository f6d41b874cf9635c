"""Chips of large scenes streamed to the training workers through Ray Data, never materialised.

Each worker builds, for each epoch, a lazy Ray Dataset of its own share of the epoch's chips: row
``k`` of epoch ``e`` draws its window from ``(seed, e, k)`` and reads it in a Ray task (windowed
reads, see :mod:`segray.io.chips`), so memory holds the chips in flight, not the set, and the
chips are new each epoch yet the same on a rerun. Every worker takes the same number of chips
(the epoch is a multiple of the global batch), as the collective step needs; validation chips are
a fixed grid, padded with weight-0 copies to a multiple of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.io import bands, chips
from segray.io.labels import DatasetSpec

if TYPE_CHECKING:
    import ray.data

    from segray.train.data import DatasetInfo

#: Chips per Ray Data block (one read task reads this many).
CHIPS_PER_BLOCK = 8
#: Training chips read for the band statistics and class counts.
SAMPLE_CHIPS = 32
#: The epoch whose draws make the statistics sample (training epochs count from 1).
SAMPLE_EPOCH = 0


@dataclass
class ChipFeed:
    """Where every worker's chips come from: the split, the dataset spec, and the epoch size."""

    split: chips.ChipSplit
    spec: DatasetSpec
    per_epoch: int
    global_batch: int
    positive_fraction: float = 0.0

    @property
    def val_count(self) -> int:
        """Validation rows, weight-0 padding included."""
        n = len(self.split.val_chips)
        return n + (-n) % self.global_batch if n else 0

    def train_rows(self, epoch: int, rank: int, world: int) -> list[dict[str, Any]]:
        """Worker ``rank``'s rows of ``epoch``: every ``world``-th chip index."""
        return [{"epoch": epoch, "k": k} for k in range(rank, self.per_epoch, world)]

    def val_rows(self, rank: int, world: int) -> list[dict[str, Any]]:
        """Worker ``rank``'s validation chips (padding repeats chips at weight 0)."""
        grid = self.split.val_chips
        rows = [
            {"scene": c.scene, "col": c.col, "row": c.row, "weight": 1.0 if i < len(grid) else 0.0}
            for i in range(self.val_count)
            for c in [grid[i % len(grid)]]
        ]
        return rows[rank::world]

    def load_train(self, row: dict[str, Any]) -> dict[str, Any]:
        """Draw and read one training chip; a chip mostly of no data is drawn again."""
        rng = np.random.default_rng([self.spec.seed, int(row["epoch"]), int(row["k"])])
        out: dict[str, Any] = {}
        for _ in range(chips.MAX_DRAWS):
            chip = chips.draw(self.split, rng, self.positive_fraction)
            out = chips.read_chip(self.split.scenes[chip.scene], chip, self.split.size, self.spec)
            if out["valid"].mean() >= chips.MIN_VALID:
                break
        return {**out, "weight": np.float32(1.0)}

    def load_val(self, row: dict[str, Any]) -> dict[str, Any]:
        """Read one validation chip of the fixed grid."""
        chip = chips.Chip(int(row["scene"]), int(row["col"]), int(row["row"]))
        out = chips.read_chip(self.split.scenes[chip.scene], chip, self.split.size, self.spec)
        return {**out, "weight": np.float32(row["weight"])}

    def train(self, epoch: int, rank: int, world: int) -> ray.data.Dataset:
        """A lazy dataset of worker ``rank``'s training chips of ``epoch``."""
        return _dataset(self.train_rows(epoch, rank, world), self.load_train)

    def val(self, rank: int, world: int) -> ray.data.Dataset | None:
        """A lazy dataset of worker ``rank``'s validation chips (None without validation)."""
        rows = self.val_rows(rank, world)
        return _dataset(rows, self.load_val) if rows else None


def _dataset(rows: list[dict[str, Any]], load: Any) -> ray.data.Dataset:
    import ray.data

    blocks = max(1, min(len(rows), -(-len(rows) // CHIPS_PER_BLOCK)))
    return ray.data.from_items(rows, override_num_blocks=blocks).map(load)


def scene_feed(
    spec: DatasetSpec, chips_per_epoch: int, global_batch: int, positive_fraction: float
) -> tuple[ChipFeed, DatasetInfo]:
    """List and check the scenes, split them, and summarise a bounded sample of training chips
    (band statistics, class counts, shape and pixel type); no scene is read whole."""
    from segray.train.data import DatasetInfo

    scenes = chips.find_scenes(spec)
    split = chips.split(scenes, spec)
    per_epoch = chips_per_epoch + (-chips_per_epoch) % global_batch
    feed = ChipFeed(split, spec, per_epoch, global_batch, positive_fraction)
    rows = [{"epoch": SAMPLE_EPOCH, "k": k} for k in range(SAMPLE_CHIPS)]
    k = bands.sample_size(SAMPLE_CHIPS)
    parts = _dataset(rows, _summarise(feed.load_train, k)).take_all()
    sampler = bands.StatsSampler()
    hist = np.zeros(256, np.int64)
    for p in parts:
        sampler.add(p["sums"], p["squares"], p["count"], p["sample"])
        hist += p["hist"]
    hist[spec.ignore_index] = 0
    max_class = int(np.nonzero(hist)[0].max()) if hist.any() else 0
    info = DatasetInfo(
        count=per_epoch + len(split.val_chips),
        image_shape=tuple(int(v) for v in parts[0]["shape"]),
        max_class=max_class,
        class_pixels=[int(v) for v in hist[: max_class + 1]],
        dtype=str(parts[0]["dtype"]),
        stats=sampler.result("the training chips") if sampler.pixels else None,
    )
    return feed, info


def _summarise(load: Any, k: int) -> Any:
    def summarise(row: dict[str, Any]) -> dict[str, Any]:
        out = load(row)
        image, valid = out["image"], out["valid"]
        rng = np.random.default_rng(int(row["k"]))
        sums, squares, count, sample = bands.image_summary(image, valid, k, rng)
        return {
            "sums": sums,
            "squares": squares,
            "count": count,
            "sample": sample,
            "hist": np.bincount(out["mask"].reshape(-1), minlength=256).astype(np.int64),
            "shape": np.asarray(image.shape, np.int64),
            "dtype": image.dtype.name,
        }

    return summarise
