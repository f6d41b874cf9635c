"""The settings of one training run: every field once, with its default, its help and its check.

``segray train`` builds its options from these fields; the run folder keeps them as
``config.yaml``, from which ``segray train --config`` repeats the run.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import model_validator

from segray.datasets.labels import Layout, ValSplit
from segray.io import storage
from segray.settings import Settings, setting
from segray.train.augment import AugmentConfig

Optimizer = Literal["adam", "rmsprop", "sgd"]
Schedule = Literal["constant", "cosine", "step"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
#: Whether a larger value of each monitored metric is better; besides these, every class's
#: validation IoU and F1 (``val_iou_<k>``, ``val_f1_<k>``), larger better.
MONITOR_MODES: dict[str, Literal["max", "min"]] = {
    "val_miou": "max",
    "val_loss": "min",
    "val_pixel_accuracy": "max",
    "loss": "min",
}
PER_CLASS = re.compile(r"val_(iou|f1)_(\d+)")
#: The thresholds a two-class run's validation scores to choose its card's threshold: steps of
#: 0.05, finer towards 0 and 1 (a class-weighted model's best threshold can lie above 0.95).
THRESHOLDS = (0.01, 0.02, 0.03, *(round(0.05 * k, 2) for k in range(1, 20)), 0.97, 0.98, 0.99)


def monitor_mode(name: str) -> Literal["max", "min"]:
    """Whether a larger value of the monitored metric ``name`` is better."""
    return MONITOR_MODES.get(name, "max")


def default_monitor(num_classes: int, val_fraction: float) -> str:
    """The metric that picks the best epoch when none is given: a two-class run's positive
    class's IoU (``val_iou_1``: mean IoU lets background's 0.97 hide a rare class at 0.05, and
    picked an early epoch of a collapsed seed), else mean IoU; the training loss without a
    validation split."""
    if not val_fraction:
        return "loss"
    return "val_iou_1" if num_classes == 2 else "val_miou"


class TrainConfig(Settings, storage.Addressed):
    """Settings of one training run; the defaults train a small U-Net on a laptop."""

    data: str = setting("", "Labelled collection: folder or s3:// prefix (or --stac).")
    out: str = setting(help="Run folder: local or s3:// prefix.")
    layout: Layout = setting("paired", "How images and labels are laid out.")
    model: str = setting("unet", "Model name; see `segray models`.")
    encoder: str | None = setting(None, "Backbone for encoder models.")
    weights: str | None = setting(None, "'imagenet' for pretrained encoders.")
    model_options: dict[str, Any] = setting(
        help="Model option KEY=VALUE (JSON value), e.g. base_filters=8.",
        flag="--model-option",
        default_factory=dict,
    )
    num_classes: int = setting(2, "Classes, background included.", flag="--classes", ge=2)
    class_names: tuple[str, ...] | None = setting(None, "Class names, e.g. background,building.")
    size: int = setting(128, "Tile size for training (pixels).", ge=1)
    bands: tuple[int, ...] | None = setting(None, "1-based bands, e.g. 1,2,3.")
    normalize: Literal["auto", "stats", "percentile", "scale"] = setting(
        "auto",
        "Pixels to model input: per-band standardisation (stats), p2-p98 stretch (percentile) "
        "or divide by the type's maximum (scale); auto: scale for uint8, else stats.",
    )
    nodata: float | None = setting(None, "Pixel value that is no data where a file sets none.")
    ignore_index: int = setting(255, "Label id that counts for nothing.", ge=0, le=255)
    palette: str | None = setting(None, "Palette JSON for --layout palette.")
    epochs: int = setting(20, "Epochs to train.", ge=1)
    batch_size: int = setting(16, "Global batch size (all workers together).", ge=1)
    workers: int = setting(2, "Ray Train workers.", ge=1)
    use_gpu: bool = setting(False, "One GPU per worker.", flag="--gpu")
    precision: TrainPrecision = setting(
        "auto",
        "Arithmetic: fp32, or bf16/fp16 mixed precision (float32 weights); auto: fp16 with "
        "--gpu, else fp32. bf16 pays on CPUs with AVX512-BF16 or AMX.",
    )
    cpus_per_worker: float = setting(1.0, "CPUs each worker reserves.", gt=0)
    gpus_per_worker: float = setting(1.0, "GPUs each worker reserves with --gpu.", gt=0)
    optimizer: Optimizer = setting("adam", "Optimiser.")
    learning_rate: float = setting(1e-3, "Initial learning rate.", flag="--lr", gt=0)
    momentum: float = setting(0.9, "Momentum of sgd.", ge=0, lt=1)
    schedule: Schedule = setting("constant", "Learning-rate schedule.")
    step_epochs: int = setting(10, "Epochs between steps of the step schedule.", ge=1)
    step_gamma: float = setting(0.1, "Factor of each step of the step schedule.", gt=0)
    loss: str = setting("ce+dice", "Loss, e.g. 0.7*ce+0.3*dice, focal, jaccard.")
    class_weights: tuple[float, ...] | None = setting(
        None, "Per-class loss weights, e.g. 1,4 (two classes, none given: see --class-balance)."
    )
    class_balance: float = setting(
        0.5,
        "Two-class runs without --class-weights weigh each class by its share of the training "
        "pixels to the power -this, mean pixel weight 1 (0: unweighted, 0.5: square root of "
        "inverse frequency, 1: inverse frequency). config.yaml records the weights used.",
        ge=0,
        le=1,
    )
    augment: AugmentConfig = setting(
        AugmentConfig.off(),
        "Augmentation (default: none; `segray train --augment`: flips, quarter turns, "
        "brightness and contrast). segray bench accuracy measured it costing the rare class's "
        "held-out IoU at 40 epochs on real tiles: 0.30 against 0.48 on Vegas roads.",
        cli=False,
    )
    monitor: str | None = setting(
        None,
        "Metric that picks the best epoch (and early stopping): val_miou, val_loss, "
        "val_pixel_accuracy, loss, or a class's val_iou_K / val_f1_K (default: val_iou_1 for two "
        "classes, else val_miou; loss without validation). config.yaml records the one used.",
    )
    patience: int | None = setting(None, "Stop after this many epochs without improvement.", ge=1)
    val_fraction: float = setting(0.2, "Share of tiles held out for validation.", ge=0, lt=1)
    threshold: float | None = setting(
        None,
        "Probability threshold of a two-class model's positive class, written to its card "
        "(default: at each epoch, the one of 0.01, 0.02, 0.03, 0.05, 0.10 ... 0.95, 0.97, 0.98, "
        "0.99 that maximises the monitored metric on the validation tiles; 0.5 without "
        "validation).",
        ge=0,
        le=1,
    )
    labels: str | None = setting(None, "One vector file labelling every scene (layout scenes).")
    stac: str | None = setting(None, "STAC ItemCollection, catalog or collection of scenes.")
    asset: str | None = setting(None, "The STAC items' image asset (default: their one image).")
    class_field: str | None = setting(None, "Vector attribute holding class ids (default: 1).")
    chips_per_epoch: int = setting(512, "Training chips per epoch (layout scenes).", ge=1)
    positive_fraction: float = setting(
        0.0, "Share of chips drawn around labelled features (layout scenes).", ge=0, le=1
    )
    val_split: ValSplit = setting("blocks", "Hold out blocks of every scene, or whole scenes.")
    block_size: int | None = setting(None, "Held-out block size in pixels (default 4 chips).", ge=1)
    seed: int = setting(0, "Seed of the split, initial weights and augmentation.")
    endpoint: str | None = setting(None, "S3 endpoint URL.", flag="--s3-endpoint")
    tracking_uri: str | None = setting(
        None,
        "MLflow tracking server (http://host:port) or store: logs settings, per-epoch metrics, "
        "the run folder's files and the best model, and registers it. A server that is down "
        "never fails the run.",
    )
    experiment: str = setting("segray", "MLflow experiment of the run (with --tracking-uri).")
    registered_model: str | None = setting(
        None, "MLflow registered model the best model becomes a version of (default: experiment)."
    )
    resume: bool = setting(False, "Continue this run from its last checkpoint.")
    resume_from: str | None = setting(None, "Start from a checkpoint folder.")
    max_failures: int = setting(2, "Worker failures to recover from.", ge=0)
    cache_mib: int = setting(
        1024,
        "Decoded tiles each worker keeps in memory when the whole set fits (MiB; 0: read and "
        "decode every epoch). Layout scenes draws new chips each epoch: never cached.",
        ge=0,
    )
    limit: int | None = setting(None, "Use only the first N tiles.", ge=1, cli=False)
    #: Test-only switches: per-rank diagnostics files, and one injected worker crash at an epoch.
    diagnostics: bool = setting(False, "Write per-rank diagnostics.", cli=False)
    fail_at_epoch: int | None = setting(None, "Kill the last worker once at this epoch.", cli=False)

    @model_validator(mode="before")
    @classmethod
    def _monitor(cls, data: Any) -> Any:
        """Resolve the default monitor from the classes and split, so config.yaml records it."""
        if isinstance(data, dict) and data.get("monitor") is None:
            fields = cls.model_fields
            classes = data.get("num_classes", fields["num_classes"].default)
            val = data.get("val_fraction", fields["val_fraction"].default)
            try:
                data = {**data, "monitor": default_monitor(int(classes), float(val))}
            except (TypeError, ValueError):
                pass  # the fields' own checks name the bad value
        return data

    @model_validator(mode="after")
    def _fits(self) -> TrainConfig:
        per_class = PER_CLASS.fullmatch(self.monitor or "")
        if self.monitor not in MONITOR_MODES and not per_class:
            raise ValueError(
                f"monitor {self.monitor!r}: expected one of {', '.join(MONITOR_MODES)}, "
                "val_iou_K or val_f1_K"
            )
        if per_class and int(per_class.group(2)) >= self.num_classes:
            raise ValueError(
                f"monitor {self.monitor}: class {per_class.group(2)} does not exist in "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        if self.monitor != "loss" and not self.val_fraction and self.layout != "scenes":
            raise ValueError(
                f"monitor {self.monitor} needs validation tiles: set --val-fraction above 0, "
                "or --monitor loss"
            )
        if self.batch_size < self.workers:
            raise ValueError(
                f"batch size {self.batch_size} is smaller than the number of workers "
                f"{self.workers}: each worker needs at least one sample per step"
            )
        if self.batch_size % self.workers:
            lo = self.batch_size - self.batch_size % self.workers
            raise ValueError(
                f"batch size {self.batch_size} is not a multiple of workers {self.workers}; "
                f"use {lo} or {lo + self.workers}"
            )
        if not self.data and not self.stac:
            raise ValueError("give the labelled data: --data, or --stac with --layout scenes")
        if self.stac and self.layout != "scenes":
            raise ValueError("--stac lists scenes: use it with --layout scenes")
        if self.resume and self.resume_from:
            raise ValueError("give either resume (this run's latest checkpoint) or resume_from")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        return self

    def thresholds(self) -> tuple[float, ...]:
        """The probability thresholds each validation scores: the grid the card's threshold is
        chosen from (a two-class run given no ``threshold``), else the one."""
        if self.num_classes != 2:
            return (0.5,)
        return THRESHOLDS if self.threshold is None else (self.threshold,)

    def compute_precision(self) -> str:
        """The precision the run computes in (``auto`` resolved)."""
        if self.precision == "auto":
            return "fp16" if self.use_gpu else "fp32"
        return self.precision

    def per_worker_batch(self) -> int:
        """Samples each worker takes per step; the global batch is this × workers."""
        return self.batch_size // self.workers
