"""``segray bench recipe``: training recipes for a rare class on real Landsat crops, held-out IoU.

The North Carolina crop of ``tests/data/real`` is cut into 32 px GeoTIFF tiles with one binary
mask per target (water, class 6, ~1.5 % of the valid pixels; shrubland, class 4, ~7 %). Blocks of
3 × 3 tiles in a fixed diagonal pattern are held out, the same for every recipe and seed. On the
remaining tiles the same small U-Net is trained by plain Keras ``model.fit`` (BCE, Adam, no Ray:
the anchor) and by ``segray.train.driver.train`` under each recipe (on one Ray Train worker,
augmentation as segray's default), all with the same epochs, batch and inputs (normalised by the
card segray builds for these tiles). Each final model predicts
the held-out tiles through segray's shared inference path; the table gives the target's IoU and
F1 there, median over seeds, and the ratio of each median IoU to the anchor's.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segray.devtools.bench import accuracy
from segray.devtools.bench.accuracy import Dataset
from segray.devtools.bench.harness import medians

DATA = Path(__file__).resolve().parents[3] / "tests" / "data" / "real"
IMAGE, CLASSES = "nc_landsat7_2000.tif", "nc_landclass96.tif"
NODATA = -99999.0
TILE = 32
#: Held out: blocks of BLOCK × BLOCK tiles whose block row + 2 × block column is 1 modulo 4
#: (45 of the 195 tiles, spread over the whole scene, each target's share near the scene's).
BLOCK, PERIOD, PHASE = 3, 4, 1
#: The rare targets: name → land class of ``nc_landclass96.tif``.
TARGETS = {"water": 6, "shrubland": 4}
ANCHOR = "keras model.fit (bce)"
OLD_DEFAULT = "old default: ce+dice, unweighted"
DEFAULT = "segray default"


@dataclass(frozen=True)
class Recipe:
    """A training recipe: its key (for ``--recipes``), its name in the table, TrainConfig fields
    over segray's defaults, and ``weights_power``, which sets ``class_weights`` from the training
    tiles' class frequencies (:func:`segray.train.losses.frequency_weights`)."""

    key: str
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    weights_power: float | None = None

    def config_fields(self, class_pixels: Sequence[int]) -> dict[str, Any]:
        """The TrainConfig fields of this recipe for a training set with these class counts."""
        from segray.train.losses import frequency_weights

        out = dict(self.fields)
        if self.weights_power is not None:
            out["class_weights"] = frequency_weights(class_pixels, self.weights_power)
        return out


#: The candidates. The old default is spelt out (uniform weights are no weights), so it stays
#: the same recipe whatever segray's defaults become; "default" is whatever TrainConfig gives now.
RECIPES = (
    Recipe("old-default", OLD_DEFAULT, {"loss": "ce+dice", "class_weights": (1.0, 1.0)}),
    Recipe("default", DEFAULT),
    Recipe("sqrt-inverse", "ce+dice, sqrt inverse-frequency", {"loss": "ce+dice"}, 0.5),
    Recipe("inverse", "ce+dice, inverse-frequency", {"loss": "ce+dice"}, 1.0),
    Recipe("focal-dice", "focal+dice", {"loss": "focal+dice", "class_weights": (1.0, 1.0)}),
)
#: ``--quick``: the anchor and segray's default on water, one seed, two epochs.
QUICK = {"targets": ("water",), "seeds": 1, "epochs": 2, "recipes": ("default",)}


#: The crop as a dataset of :mod:`segray.devtools.bench.accuracy` (the target set per call).
NC = Dataset(IMAGE, CLASSES, 6, TILE, "NC Landsat 7", NODATA)


def held_out(row: int, col: int) -> bool:
    """Whether the tile at pixel ``(row, col)`` of the scene is in the held-out blocks."""
    return accuracy.held_out(row, col, TILE)


def cut_tiles(root: Path, target: int, data: Path = DATA) -> tuple[str, str]:
    """The scene's 32 px tiles and ``target`` masks in ``root/train`` and ``root/test``
    (:func:`segray.devtools.bench.accuracy.cut_tiles`)."""
    if not (data / IMAGE).exists():
        raise FileNotFoundError(f"{data / IMAGE}: the bench reads the crops of a segray checkout")
    return accuracy.cut_tiles(root, dataclasses.replace(NC, target=target), data)


def load_rows(folder: str) -> list[dict[str, Any]]:
    """Every tile of a paired folder decoded as training decodes it (no data labelled 255)."""
    return accuracy.load_rows(folder, TILE)


def class_pixels(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Pixels of class 0 and 1 in the rows' masks (no data left out)."""
    masks = np.concatenate([r["mask"].ravel() for r in rows])
    return [int(np.sum(masks == 0)), int(np.sum(masks == 1))]


score = accuracy.score


def _config(train_dir: str, out: str, seed: int, epochs: int, batch: int, **fields: Any) -> Any:
    import os

    from segray.train.augment import AugmentConfig
    from segray.train.config import TrainConfig

    if fields.get("augment") == "off":
        fields["augment"] = AugmentConfig.off()
    return TrainConfig(
        data=train_dir,
        out=out,
        num_classes=2,
        class_names=("other", "target"),
        size=TILE,
        epochs=epochs,
        batch_size=batch,
        workers=1,
        cpus_per_worker=float(os.cpu_count() or 1),
        max_failures=0,
        model_options={"base_filters": 8},
        val_fraction=0.0,  # every recipe learns from the same tiles; the held-out set scores
        monitor="loss",
        seed=seed,
        **fields,
    )


def keras_anchor(
    train_dir: str,
    rows: Sequence[dict[str, Any]],
    test: Sequence[dict[str, Any]],
    seed: int,
    epochs: int,
    batch: int,
    out: str,
) -> tuple[float, float]:
    """Plain Keras: the same U-Net from segray.models, ``compile(adam, bce)`` + ``fit``, inputs
    by the card segray would write for these tiles, no-data pixels weighted 0."""
    import keras

    from segray import models
    from segray.train.driver import prepare

    card = prepare(_config(train_dir, out, seed, epochs, batch)).card
    x = np.stack([card.normalize_pixels(r["image"], r["valid"]) for r in rows]).astype("float32")
    y = np.stack([np.where(r["valid"], r["mask"], 0) for r in rows]).astype("float32")[..., None]
    w = np.stack([r["valid"] for r in rows]).astype("float32")
    keras.utils.set_random_seed(seed)
    model = models.build_model("unet", 2, tuple(card.input_shape), base_filters=8)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, sample_weight=w, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
    return score(model, card, test)


def segray_run(
    train_dir: str,
    test: Sequence[dict[str, Any]],
    seed: int,
    epochs: int,
    batch: int,
    out: str,
    **fields: Any,
) -> tuple[float, float, Any]:
    """Train through ``segray.train.driver.train``; the last epoch's model scores the held-out
    tiles. Returns IoU, F1 and the config the run saved."""
    from segray.models import saving
    from segray.train.driver import load_config, train

    train(_config(train_dir, out, seed, epochs, batch, **fields))
    model, card = saving.load_model(f"{out}/last")
    return (*score(model, card, test), load_config(out))


def _ratio(value: float, anchor: float) -> str:
    return f"{value / anchor:.2f}" if anchor > 0 else "n/a"


def table(results: dict[str, dict[str, list[tuple[float, float]]]], seeds: int) -> list[str]:
    """Lines of the table: per target and recipe the median IoU and F1 and the IoU ratio."""
    lines = [
        f"{'target':<10} {'recipe':<34} {'IoU':>6} {'F1':>6} {'x keras':>8}  IoU per seed",
    ]
    for target, by_recipe in results.items():
        anchor = medians(by_recipe[ANCHOR])[0]
        for name, runs in by_recipe.items():
            iou, f1 = medians(runs)
            each = " ".join(f"{i:.3f}" for i, _ in runs)
            lines.append(
                f"{target:<10} {name:<34} {iou:>6.3f} {f1:>6.3f} {_ratio(iou, anchor):>8}  {each}"
            )
    for target, by_recipe in results.items():
        if OLD_DEFAULT in by_recipe and DEFAULT in by_recipe:
            (old_iou, old_f1), (new_iou, new_f1) = (
                medians(by_recipe[k]) for k in (OLD_DEFAULT, DEFAULT)
            )
            lines.append(
                f"{target}: old default -> segray default: IoU {old_iou:.3f} -> {new_iou:.3f} "
                f"(x{_ratio(new_iou, old_iou)}), F1 {old_f1:.3f} -> {new_f1:.3f}"
            )
    lines.append(f"(median over {seeds} seed(s); x keras = median IoU / the Keras anchor's)")
    return lines


def bench_recipe(
    targets: Sequence[str] = tuple(TARGETS),
    seeds: int = 3,
    epochs: int = 30,
    batch: int = 16,
    recipes: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every recipe on every target for ``seeds`` seeds; print and return the table."""
    from segray.runtime import init_ray

    chosen = [r for r in RECIPES if recipes is None or r.key in recipes]
    unknown = set(recipes or ()) - {r.key for r in RECIPES}
    if unknown or set(targets) - set(TARGETS):
        raise ValueError(f"unknown recipes or targets: {sorted(unknown)} {list(targets)}")
    init_ray(log_to_driver=False)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    defaults: dict[str, Any] = {}
    pixels: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="segray-bench-recipe-") as tmp:
        for target in targets:
            train_dir, test_dir = cut_tiles(Path(tmp) / target, TARGETS[target])
            rows, test = load_rows(train_dir), load_rows(test_dir)
            counts = pixels[target] = class_pixels(rows)
            echo(
                f"{target}: {len(rows)} training tiles ({counts[1] / sum(counts):.1%} target), "
                f"{len(test)} held out ({class_pixels(test)[1] / sum(class_pixels(test)):.1%})"
            )
            by_recipe: dict[str, list[tuple[float, float]]] = {ANCHOR: []}
            by_recipe |= {r.name: [] for r in chosen}
            for seed in range(seeds):
                run = f"{tmp}/{target}-s{seed}"
                anchor = keras_anchor(train_dir, rows, test, seed, epochs, batch, f"{run}-keras")
                by_recipe[ANCHOR].append(anchor)
                for k, recipe in enumerate(chosen):
                    iou, f1, saved = segray_run(
                        train_dir,
                        test,
                        seed,
                        epochs,
                        batch,
                        f"{run}-r{k}",
                        **recipe.config_fields(counts),
                    )
                    by_recipe[recipe.name].append((iou, f1))
                    if recipe.name == DEFAULT:
                        defaults[target] = {k: saved.get(k) for k in ("loss", "class_weights")}
                    echo(f"  seed {seed} {recipe.name}: IoU {iou:.3f} F1 {f1:.3f}")
                echo(f"  seed {seed} {ANCHOR}: IoU {anchor[0]:.3f} F1 {anchor[1]:.3f}")
            results[target] = by_recipe
    echo(f"\nbench recipe: unet base_filters=8, {TILE} px tiles, {epochs} epochs, batch {batch}")
    for target, saved in defaults.items():
        echo(f"segray default on {target} (from its config.yaml): {saved}")
    lines = table(results, seeds)
    for line in lines:
        echo(line)
    return {"results": results, "defaults": defaults, "class_pixels": pixels, "table": lines}
