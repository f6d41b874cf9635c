"""``segray bench accuracy``: segray's training against a plain Keras ``fit``, on real datasets.

Each dataset of ``tests/data/real`` (:data:`DATASETS`) is cut into GeoTIFF tiles with a binary
mask of its rare class. Blocks of 3 × 3 tiles in a fixed diagonal pattern are held out: the same
tiles for every side, seed and run. On the remaining tiles the same U-Net is trained, with the
same epochs and global batch, by:

- ``keras``: plain Keras, ``compile(adam, bce+dice)`` + ``fit`` in one process, on every
  training tile (no-data pixels counting for nothing), inputs normalised by the card segray
  builds for these tiles; its last epoch is scored (the anchor);
- ``segray-1w`` / ``segray-2w``: :func:`segray.train.driver.train` on 1 or 2 Ray Train workers
  with segray's defaults (validation split, best epoch, class balance, augmentation) and any
  ``--set`` overrides; the run's ``model.keras`` is scored, the model a user gets.

Every model predicts the held-out tiles through segray's shared inference path; with ``--tta``
each model is scored a second time with test-time augmentation (rows ``<side>+<tta>``), and the
seconds of both scorings give its cost. The table gives the rare class's IoU and F1 there, the
median and spread over seeds, and each median's ratio to the anchor's. A seed is flagged as
collapsed when its IoU is below 0.7 × its side's median.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "tests" / "data" / "real"
#: Held out: blocks of BLOCK × BLOCK tiles whose block row + 2 × block column is PHASE mod PERIOD.
BLOCK, PERIOD, PHASE = 3, 4, 1
ANCHOR = "keras"
SIDES = (ANCHOR, "segray-1w", "segray-2w")
#: A seed whose IoU is below this share of its side's median has collapsed.
COLLAPSE = 0.7


@dataclass(frozen=True)
class Dataset:
    """A real labelled raster of ``tests/data/real``: the image, its label raster on the same
    grid, the label value of the rare class, the tile size, and a no-data value for the image."""

    image: str
    labels: str
    target: int
    tile: int
    what: str
    nodata: float | None = None


DATASETS = {
    "nc-water": Dataset(
        "nc_landsat7_2000.tif",
        "nc_landclass96.tif",
        6,
        32,
        "Landsat 7, 5 bands float32, 28.5 m, water ~1.5 %",
        -99999.0,
    ),
    "vegas-roads": Dataset(
        "vegas_pan.tif",
        "vegas_roads.tif",
        1,
        64,
        "WorldView pan, 1 band uint16, 0.3 m, roads ~3.4 %",
    ),
    "osbs-trees": Dataset(
        "osbs_rgb.tif",
        "osbs_trees.tif",
        1,
        32,
        "NEON RGB, 3 bands uint8, 0.1 m, tree-crown boxes ~54 %",
    ),
}


def check_names(datasets: Sequence[str], sides: Sequence[str], known: Sequence[str]) -> None:
    """Refuse unknown datasets and sides (of ``known``), or none of either, naming the choices."""
    unknown = [*(set(datasets) - set(DATASETS)), *(set(sides) - set(known))]
    if unknown or not datasets or not sides:
        raise ValueError(
            f"unknown datasets or sides {sorted(unknown)}: datasets any of "
            f"{', '.join(DATASETS)}; sides any of {', '.join(known)}"
        )


def held_out(row: int, col: int, tile: int) -> bool:
    """Whether the tile at pixel ``(row, col)`` lies in the held-out blocks."""
    block_row, block_col = row // tile // BLOCK, col // tile // BLOCK
    return (block_row + 2 * block_col) % PERIOD == PHASE


def cut_tiles(root: Path, data: Dataset, folder: Path = DATA) -> tuple[str, str]:
    """Write the dataset's tiles and binary masks (1: the target, 0: other) into ``root/train``
    and ``root/test`` (paired layout); returns both folders."""
    import rasterio

    from segray.io import imagery

    with rasterio.open(folder / data.image) as ds:
        pixels, transform, crs = np.moveaxis(ds.read(), 0, -1), ds.transform, ds.crs.to_string()
        nodata = data.nodata if data.nodata is not None else ds.nodata
    with rasterio.open(folder / data.labels) as ds:
        labels = ds.read(1)
    for part in ("train", "test"):
        for kind in ("images", "masks"):
            (root / part / kind).mkdir(parents=True, exist_ok=True)
    h, w = labels.shape
    t = data.tile
    for r in range(0, h - t + 1, t):
        for c in range(0, w - t + 1, t):
            part = root / ("test" if held_out(r, c, t) else "train")
            name = f"r{r:04d}_c{c:04d}.tif"
            where = transform @ rasterio.Affine.translation(c, r)
            mask = (labels[r : r + t, c : c + t] == data.target).astype(np.uint8)
            image = imagery.encode_geotiff(pixels[r : r + t, c : c + t], crs, where, nodata=nodata)
            (part / "images" / name).write_bytes(image)
            (part / "masks" / name).write_bytes(imagery.encode_geotiff(mask, crs, where))
    return str(root / "train"), str(root / "test")


def load_rows(folder: str, tile: int) -> list[dict[str, Any]]:
    """Every tile of a paired folder decoded as training decodes it (no data labelled 255)."""
    from segray.datasets import labels

    spec = labels.DatasetSpec(root=folder, num_classes=2, size=tile, val_fraction=0.0)
    return [labels.load_sample(s, spec) for s in labels.find_samples(spec)]


def target_share(rows: Sequence[dict[str, Any]]) -> float:
    """The target's share of the rows' labelled pixels."""
    masks = np.concatenate([r["mask"].ravel() for r in rows])
    return float(np.sum(masks == 1) / max(1, np.sum(masks <= 1)))


def score(
    model: Any, card: Any, rows: Sequence[dict[str, Any]], tta: str = "none"
) -> tuple[float, float]:
    """The target's IoU and F1 over all held-out pixels, predicted as ``segray eval`` does."""
    from segray import metrics
    from segray.evaluate.evaluate import predict_rows

    cm = metrics.ConfusionMatrix(2, ignore_index=255)
    for row, pred in zip(rows, predict_rows(model, card, list(rows), tta=tta), strict=True):
        cm.update(row["mask"], pred)
    iou, f1 = cm.iou[1], cm.dice[1]
    return (0.0 if np.isnan(iou) else float(iou)), (0.0 if np.isnan(f1) else float(f1))


def train_config(
    train_dir: str, out: str, tile: int, seed: int, epochs: int, batch: int, workers: int, **fields
) -> Any:
    """segray's defaults for this dataset, side and seed, with ``fields`` over them."""
    from segray.train.config import TrainConfig

    return TrainConfig(
        data=train_dir,
        out=out,
        num_classes=2,
        class_names=("other", "target"),
        size=tile,
        epochs=epochs,
        batch_size=batch,
        workers=workers,
        max_failures=0,
        seed=seed,
        **fields,
    )


def keras_side(
    train_dir: str,
    rows: Sequence[dict[str, Any]],
    test: Sequence[dict[str, Any]],
    run: Mapping[str, Any],
    out: str,
) -> dict[str, tuple[float, float]]:
    """Plain Keras: the same U-Net, ``compile(adam 1e-3, bce + dice)`` + ``fit`` on every
    training tile, inputs by the card segray would write for them; BCE and Dice over each tile's
    data pixels only (the validity map travels beside the target)."""
    import keras
    from keras import ops

    from segray import models
    from segray.train.driver import prepare

    cfg = train_config(train_dir, out, run["tile"], run["seed"], run["epochs"], run["batch"], 1)
    card = prepare(cfg.replace(**run["model_fields"])).card
    x = np.stack([card.normalize_pixels(r["image"], r["valid"]) for r in rows]).astype("float32")
    # the target and, beside it, where the pixels are data: no-data pixels count for nothing
    y = np.stack([np.stack([np.where(r["valid"], r["mask"], 0), r["valid"]], -1) for r in rows])

    def bce_dice(target: Any, logits: Any) -> Any:
        truth, valid = target[..., :1], target[..., 1:]
        p = ops.sigmoid(logits)
        pixels = ops.maximum(ops.sum(valid, axis=(1, 2, 3)), 1.0)
        bce = keras.losses.binary_crossentropy(truth, logits, from_logits=True)[..., None]
        bce = ops.sum(bce * valid, axis=(1, 2, 3)) / pixels
        inter = ops.sum(truth * p * valid, axis=(1, 2, 3))
        dice = 1 - (2 * inter + 1) / (ops.sum((truth + p) * valid, axis=(1, 2, 3)) + 1)
        return bce + dice

    keras.utils.set_random_seed(run["seed"])
    options = dict(run["model_fields"].get("model_options", {}))
    model = models.build_model("unet", 2, tuple(card.input_shape), **options)
    model.compile(keras.optimizers.Adam(1e-3), bce_dice)
    model.fit(x, y.astype("float32"), batch_size=run["batch"], epochs=run["epochs"], verbose=0)
    return scores(model, card, test, run)


def scores(
    model: Any, card: Any, test: Sequence[dict[str, Any]], run: Mapping[str, Any]
) -> dict[str, tuple[float, float]]:
    """IoU and F1 without test-time augmentation and (``run['tta']``) with it, and the seconds
    each scoring took (`` seconds`` and `` seconds+<tta>``, as IoU, F1 = seconds, 0)."""
    out: dict[str, tuple[float, float]] = {}
    for mode in dict.fromkeys(("none", run["tta"])):
        score(model, card, test[:2], mode)  # compiled before it is timed
        start = time.perf_counter()
        key = "" if mode == "none" else f"+{mode}"
        out[key] = score(model, card, test, mode)
        out[f" seconds{key}"] = (time.perf_counter() - start, 0.0)
    return out


def segray_side(
    train_dir: str, test: Sequence[dict[str, Any]], run: Mapping[str, Any], workers: int, out: str
) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """``segray.train.driver.train`` with the defaults and ``run['fields']``; the run's
    ``model.keras`` (its best epoch) scores the held-out tiles (:func:`scores`). Returns the
    scores and what the run chose (best epoch, epochs run, the card's threshold)."""
    from segray.models import saving
    from segray.train.driver import train

    fields = {**run["model_fields"], **run["fields"]}
    cfg = train_config(
        train_dir, out, run["tile"], run["seed"], run["epochs"], run["batch"], workers, **fields
    )
    result = train(cfg)
    model, card = saving.load_model(out)
    return scores(model, card, test, run), {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "threshold": card.threshold,
    }


def summary(runs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Median IoU and F1, their spread, and the seeds that collapsed."""
    ious = [i for i, _ in runs]
    med = statistics.median(ious)
    return {
        "iou": med,
        "f1": statistics.median(f for _, f in runs),
        "lo": min(ious),
        "hi": max(ious),
        "collapsed": [k for k, i in enumerate(ious) if i < COLLAPSE * med],
    }


def table(results: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]) -> list[str]:
    """Lines of the table: per dataset and side the median IoU and F1, the spread, the ratio to
    the anchor, and the IoU of each seed (``!`` marks a collapsed seed)."""
    lines = [
        f"{'dataset':<12} {'side':<16} {'IoU':>6} {'F1':>6} {'min-max':>12} {'x keras':>8}  "
        "IoU per seed"
    ]
    costs = []
    for name, by_side in results.items():
        anchor = summary(by_side[ANCHOR])["iou"] if by_side.get(ANCHOR) else None
        for side, runs in by_side.items():
            if " seconds" in side:  # the cost of test-time augmentation: its seconds / none's
                base, _, mode = side.partition(" seconds+")
                if mode and by_side.get(f"{base} seconds"):
                    plain = by_side[f"{base} seconds"]
                    ratio = statistics.median(
                        t / max(p, 1e-9) for (t, _), (p, _) in zip(runs, plain, strict=True)
                    )
                    costs.append(f"{name} {base}: scoring with --tta {mode} takes {ratio:.1f}x")
                continue
            if not runs:
                continue
            s = summary(runs)
            ratio = f"{s['iou'] / anchor:.2f}" if anchor else "n/a"
            each = " ".join(
                f"{i:.3f}{'!' if k in s['collapsed'] else ''}" for k, (i, _) in enumerate(runs)
            )
            spread = f"{s['lo']:.3f}-{s['hi']:.3f}"
            lines.append(
                f"{name:<12} {side:<16} {s['iou']:>6.3f} {s['f1']:>6.3f} {spread:>12} "
                f"{ratio:>8}  {each}"
            )
    lines.extend(costs)
    lines.append(
        f"(median over seeds; x keras = median IoU / the plain fit's; ! = below {COLLAPSE} x "
        "its side's median)"
    )
    return lines


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` TrainConfig overrides (values read as YAML: 0.5, true, [1, 2]), each key
    checked against TrainConfig's fields."""
    import yaml

    from segray.train.config import TrainConfig

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in TrainConfig.model_fields:
            raise ValueError(f"--set {item!r}: give KEY=VALUE with KEY a training setting")
        out[key] = yaml.safe_load(value)
    return out


def bench_accuracy(
    datasets: Sequence[str] = tuple(DATASETS),
    sides: Sequence[str] = SIDES,
    seeds: int = 3,
    epochs: int = 40,
    batch: int = 16,
    base_filters: int = 16,
    sets: Mapping[str, Any] | None = None,
    tta: str = "none",
    first_seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every side on every dataset for ``seeds`` seeds from ``first_seed``; print and
    return the table."""
    from segray.runtime import init_ray

    check_names(datasets, sides, SIDES)
    if seeds < 1 or epochs < 1 or first_seed < 0:
        raise ValueError("--seeds and --epochs must be at least 1, --first-seed at least 0")
    init_ray(log_to_driver=False)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    chosen: dict[str, dict[str, list[dict[str, Any]]]] = {}
    model_fields = {"model_options": {"base_filters": base_filters}}
    with tempfile.TemporaryDirectory(prefix="segray-bench-accuracy-") as tmp:
        for name in datasets:
            data = DATASETS[name]
            train_dir, test_dir = cut_tiles(Path(tmp) / name, data)
            rows, test = load_rows(train_dir, data.tile), load_rows(test_dir, data.tile)
            echo(
                f"{name}: {data.what}; {len(rows)} training tiles ({target_share(rows):.1%} "
                f"target), {len(test)} held out ({target_share(test):.1%})"
            )
            results[name] = {}
            chosen[name] = {side: [] for side in sides if side != ANCHOR}
            for seed in range(first_seed, first_seed + seeds):
                run = {
                    "tile": data.tile,
                    "seed": seed,
                    "epochs": epochs,
                    "batch": batch,
                    "tta": tta,
                    "fields": dict(sets or {}),
                    "model_fields": model_fields,
                }
                for side in sides:
                    start = time.monotonic()
                    out = f"{tmp}/{name}-s{seed}-{side}"
                    if side == ANCHOR:
                        got = keras_side(train_dir, rows, test, run, out)
                        note = ""
                    else:
                        got, picked = segray_side(train_dir, test, run, int(side[-2]), out)
                        chosen[name][side].append(picked)
                        note = (
                            f" (best epoch {picked['best_epoch']}/{picked['epochs_run']}, "
                            f"threshold {picked['threshold']:.2f})"
                        )
                    for key, value in got.items():
                        results[name].setdefault(f"{side}{key}", []).append(value)
                    iou, f1 = got[""]
                    extra = ""
                    if f"+{tta}" in got:
                        t_iou, t_f1 = got[f"+{tta}"]
                        cost = got[f" seconds+{tta}"][0] / max(got[" seconds"][0], 1e-9)
                        extra = f"; +{tta} IoU {t_iou:.3f} F1 {t_f1:.3f} ({cost:.1f}x the seconds)"
                    echo(
                        f"  seed {seed} {side}: IoU {iou:.3f} F1 {f1:.3f}{note}{extra} "
                        f"[{time.monotonic() - start:.0f} s]"
                    )
    sets_text = ", ".join(f"{k}={v}" for k, v in (sets or {}).items()) or "none"
    echo(
        f"\nbench accuracy: unet base_filters={base_filters}, {epochs} epochs, batch {batch}, "
        f"{seeds} seed(s), tta {tta}, segray overrides: {sets_text}"
    )
    lines = table(results)
    for line in lines:
        echo(line)
    return {"results": results, "chosen": chosen, "table": lines}
