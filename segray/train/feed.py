"""Training data streamed to the workers through Ray Data: tiles, or chips of large scenes.

Each worker builds, for each epoch, a lazy Ray Dataset of its own share of the epoch's rows, read
and decoded in Ray tasks, so memory holds the samples in flight, not the set (unless a tile set
is small enough for the cache below). Every worker takes
the same number of rows (the epoch is padded with weight-0 copies to a multiple of the global
batch), as the collective step needs, and padding counts for nothing.

- :class:`TileFeed`: every tile once per epoch, in an order drawn from ``(seed, epoch)``. Where
  the decoded set fits the run's ``cache_mib``, each worker decodes it once, before its first
  epoch, and every epoch takes its rows from memory in the same order (:class:`CachedRows`): on
  a small machine the reads of every epoch otherwise compete with the step for the same cores.
- :class:`ChipFeed`: row ``k`` of epoch ``e`` draws its window from ``(seed, e, k)`` and reads it by
  windowed reads (:mod:`segray.datasets.chips`), so the chips are new each epoch yet the same on a
  rerun; validation chips are a fixed grid.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.datasets import chips, sampling
from segray.datasets import stats as band_stats
from segray.datasets.labels import DatasetSpec, Sample, load_palette, load_sample
from segray.runtime import Shared

if TYPE_CHECKING:
    import ray.data

    from segray.train.data import DatasetInfo

#: Chips per Ray Data block (one read task reads this many).
CHIPS_PER_BLOCK = 8
#: Batches each worker's stream may hold in Ray's object store, read ahead of the step.
BATCHES_AHEAD = 4
#: The least object store a worker's stream may use (a few blocks, whatever their size).
MIN_STREAM_BYTES = 16 * 2**20
#: Training chips read for the band statistics and class counts.
SAMPLE_CHIPS = 32
#: The epoch whose draws make the statistics sample (training epochs count from 1).
SAMPLE_EPOCH = 0


def padded(count: int, multiple: int) -> int:
    """``count`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return count + (-count) % multiple if count else 0


@dataclass
class TileFeed:
    """The checked tiles of a run, split; each epoch's rows shuffled and padded."""

    samples: Shared  # (training samples, validation samples)
    spec: DatasetSpec
    global_batch: int
    palette: np.ndarray | None = None
    row_bytes: int = 0
    cache_bytes: int = 0

    @property
    def train_samples(self) -> list[Sample]:
        return self.samples.get()[0]

    @property
    def val_samples(self) -> list[Sample]:
        return self.samples.get()[1]

    @property
    def train_count(self) -> int:
        return len(self.train_samples)

    @property
    def val_total(self) -> int:
        return len(self.val_samples)

    def train_rows(self, epoch: int, rank: int, world: int) -> list[dict[str, Any]]:
        """Worker ``rank``'s rows of ``epoch``: each tile once (weight 1), copies (weight 0)."""
        n = len(self.train_samples)
        order = np.random.default_rng([self.spec.seed, epoch]).permutation(n)
        picks = np.resize(order, padded(n, self.global_batch))
        rows = [_sample_row(self.train_samples[i], j < n) for j, i in enumerate(picks.tolist())]
        return rows[rank::world]

    def val_rows(self, rank: int, world: int) -> list[dict[str, Any]]:
        n = len(self.val_samples)
        picks = np.resize(np.arange(n), padded(n, self.global_batch))
        rows = [_sample_row(self.val_samples[i], j < n) for j, i in enumerate(picks.tolist())]
        return rows[rank::world]

    def cached(self) -> bool:
        """True when every decoded tile fits the cache (each worker keeps them all, by id)."""
        every = (*self.train_samples, *self.val_samples)
        total = self.row_bytes * len(every)
        return 0 < total <= self.cache_bytes and len({s.id for s in every}) == len(every)

    def train(self, epoch: int, rank: int, world: int) -> ray.data.Dataset | CachedRows:
        """A lazy dataset of worker ``rank``'s tiles of ``epoch`` (the cache's, once filled)."""
        return self._rows(self.train_rows(epoch, rank, world), world)

    def val(self, rank: int, world: int) -> ray.data.Dataset | CachedRows | None:
        """A lazy dataset of worker ``rank``'s validation tiles (None without validation)."""
        rows = self.val_rows(rank, world) if self.val_samples else []
        return self._rows(rows, world) if rows else None

    def _rows(self, rows: list[dict[str, Any]], world: int) -> ray.data.Dataset | CachedRows:
        load = functools.partial(load_tile, self.spec, self.palette)
        if not self.cached():
            return _dataset(rows, load, stream_budget(self.global_batch // world, self.row_bytes))
        key = self.samples.key()
        if key not in _CACHE:  # the first use in this process: decode every tile, once
            _CACHE.clear()  # one run's tiles at a time
            every = [_sample_row(s, True) for s in (*self.train_samples, *self.val_samples)]
            _CACHE[key] = {str(r["id"]): _kept(r) for r in _dataset(every, load).iter_rows()}
        return CachedRows(rows, _CACHE[key])


#: The decoded tiles of the run this process trains: sample id → image, mask, valid.
_CACHE: dict[str, dict[str, dict[str, np.ndarray]]] = {}
_KEPT = ("image", "mask", "valid")


def _kept(row: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: row[k] for k in _KEPT}


@dataclass
class CachedRows:
    """An epoch's rows from a worker's cache of decoded tiles, in the epoch's order, batched as
    a Ray Dataset's ``iter_batches`` batches them."""

    rows: list[dict[str, Any]]
    cache: dict[str, dict[str, np.ndarray]]

    def iter_batches(self, *, batch_size: int, **_: Any) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.rows), batch_size):
            part = self.rows[start : start + batch_size]
            tiles = [self.cache[str(r["id"])] for r in part]
            batch = {k: np.stack([t[k] for t in tiles]) for k in _KEPT}
            batch["weight"] = np.asarray([r["weight"] for r in part], np.float32)
            batch["id"] = np.asarray([r["id"] for r in part], dtype=object)
            yield batch


def load_tile(spec: DatasetSpec, palette: np.ndarray | None, row: dict[str, Any]) -> dict[str, Any]:
    """Read, decode and check one tile (:func:`segray.datasets.labels.load_sample`)."""
    sample = Sample(row["id"], row["image_uri"], tuple(row["label_uris"]))
    out = load_sample(sample, spec, palette)
    return {**out, "weight": np.float32(row["weight"])}


def _sample_row(sample: Sample, real: bool) -> dict[str, Any]:
    return {
        "id": sample.id,
        "image_uri": sample.image,
        "label_uris": list(sample.labels),
        "weight": 1.0 if real else 0.0,
    }


def tile_feed(
    spec: DatasetSpec, global_batch: int, cache_bytes: int = 0
) -> tuple[TileFeed, DatasetInfo]:
    """List, split and check the tiles (each read once, none kept) and summarise them."""
    from segray.train.data import scan

    train_s, val_s, info = scan(spec)
    palette = load_palette(spec) if spec.layout == "palette" else None
    samples = Shared((train_s, val_s)).share()
    feed = TileFeed(samples, spec, global_batch, palette, row_bytes(info), cache_bytes)
    return feed, info


@dataclass
class ChipFeed:
    """Where every worker's chips come from: the split, the dataset spec, and the epoch size."""

    chips: Shared  # the sampling.ChipSplit: scenes, their labels, held-out blocks
    spec: DatasetSpec
    per_epoch: int
    global_batch: int
    positive_fraction: float = 0.0
    row_bytes: int = 0

    @property
    def split(self) -> sampling.ChipSplit:
        return self.chips.get()

    @property
    def train_count(self) -> int:
        return self.per_epoch

    @property
    def val_total(self) -> int:
        return len(self.split.val_chips)

    @property
    def val_count(self) -> int:
        """Validation rows, weight-0 padding included."""
        return padded(len(self.split.val_chips), self.global_batch)

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
            chip = sampling.draw(self.split, rng, self.positive_fraction)
            out = chips.read_chip(self.split.scenes[chip.scene], chip, self.split.size, self.spec)
            if out["valid"].mean() >= chips.MIN_VALID:
                break
        return {**out, "weight": np.float32(1.0)}

    def load_val(self, row: dict[str, Any]) -> dict[str, Any]:
        """Read one validation chip of the fixed grid."""
        chip = sampling.Chip(int(row["scene"]), int(row["col"]), int(row["row"]))
        out = chips.read_chip(self.split.scenes[chip.scene], chip, self.split.size, self.spec)
        return {**out, "weight": np.float32(row["weight"])}

    def train(self, epoch: int, rank: int, world: int) -> ray.data.Dataset:
        """A lazy dataset of worker ``rank``'s training chips of ``epoch``."""
        budget = stream_budget(self.global_batch // world, self.row_bytes)
        return _dataset(self.train_rows(epoch, rank, world), self.load_train, budget)

    def val(self, rank: int, world: int) -> ray.data.Dataset | None:
        """A lazy dataset of worker ``rank``'s validation chips (None without validation)."""
        rows = self.val_rows(rank, world)
        budget = stream_budget(self.global_batch // world, self.row_bytes)
        return _dataset(rows, self.load_val, budget) if rows else None


def row_bytes(info: DatasetInfo) -> int:
    """Bytes of one loaded row: its image, mask and valid map."""
    h, w, c = info.image_shape
    return h * w * (c * np.dtype(info.dtype).itemsize + 2)


def stream_budget(per_worker: int, row: int) -> int:
    """Object store bytes a worker's stream may hold: :data:`BATCHES_AHEAD` batches of rows."""
    return max(MIN_STREAM_BYTES, BATCHES_AHEAD * per_worker * row)


def _dataset(rows: list[dict[str, Any]], load: Any, budget: int = 0) -> ray.data.Dataset:
    """A lazy dataset loading ``rows`` in Ray tasks, holding at most ``budget`` bytes of them in
    Ray's object store (Ray Data's backpressure; 0: its default share of the store)."""
    import ray.data

    blocks = max(1, min(len(rows), -(-len(rows) // CHIPS_PER_BLOCK)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map(load)
    if budget:
        options = ds.context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    return ds


def scene_feed(
    spec: DatasetSpec, chips_per_epoch: int, global_batch: int, positive_fraction: float
) -> tuple[ChipFeed, DatasetInfo]:
    """List and check the scenes, split them, and summarise a bounded sample of training chips
    (band statistics, class counts, shape and pixel type); no scene is read whole."""
    from segray.train.data import DatasetInfo

    scenes = chips.find_scenes(spec)
    for scene in scenes:  # each scene's labels to the object store, fetched where it is read
        if scene.vector is not None:
            scene.vector.share()
    split = sampling.split(scenes, spec)
    per_epoch = padded(chips_per_epoch, global_batch)
    feed = ChipFeed(Shared(split).share(), spec, per_epoch, global_batch, positive_fraction)
    rows = [{"epoch": SAMPLE_EPOCH, "k": k} for k in range(SAMPLE_CHIPS)]
    k = band_stats.sample_size(SAMPLE_CHIPS)
    parts = _dataset(rows, _summarise(feed.load_train, k)).take_all()
    sampler = band_stats.StatsSampler()
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
    feed.row_bytes = row_bytes(info)
    return feed, info


def _summarise(load: Any, k: int) -> Any:
    def summarise(row: dict[str, Any]) -> dict[str, Any]:
        out = load(row)
        image, valid = out["image"], out["valid"]
        rng = np.random.default_rng(int(row["k"]))
        sums, squares, count, sample = band_stats.image_summary(image, valid, k, rng)
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
