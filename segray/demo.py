"""The main job on the embedded default: synthetic scenes, local storage, tiny settings.

``make demo`` runs this end to end: synthesise a multi-class satellite collection, train a small
U-Net on 2 Ray Train workers, segment held-out GeoTIFF tiles and one large scene with the bulk
job, evaluate, and print where everything is. ``--s3`` does the same with every URI on s3://,
against a moto S3 server started on 127.0.0.1 for the run and stopped at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from segray import storage


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in a few minutes on 2 cores."""

    out: str = "runs/demo"
    use_s3: bool = False
    count: int = 160
    size: int = 64
    seed: int = 0
    scene_size: int = 512
    epochs: int = 16
    workers: int = 2
    held_out: int = 16


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the demo and return where everything is."""
    if not config.use_s3:
        return _run(config, config.out, None, echo)
    from segray.s3server import TEST_CREDENTIALS, MotoServer

    # Set before Ray starts, so init_ray forwards the endpoint and credentials to the workers.
    saved = {k: os.environ.get(k) for k in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    with MotoServer() as server:
        try:
            os.environ.update(TEST_CREDENTIALS)
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            echo(f"S3 mode: moto server at {server.endpoint} (stopped when the demo ends)")
            root = "s3://segray-demo/demo"
            storage.make_bucket(root)
            return _run(config, root, server.endpoint, echo)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _synthesise(config: DemoConfig, root: str, ep: str | None, echo: Callable) -> dict[str, str]:
    from segray import synth

    paths = {k: storage.join(root, k) for k in ("data", "heldout", "scenes")}
    echo(
        f"[1/5] synthesising {config.count} training tiles, {config.held_out} held-out GeoTIFF "
        f"tiles and a {config.scene_size}px scene under {root}"
    )
    synth.write_collection(
        paths["data"], count=config.count, size=config.size, seed=config.seed, endpoint=ep
    )
    synth.write_collection(
        paths["heldout"],
        layout="geotiff",
        count=config.held_out,
        size=config.size,
        seed=config.seed + 1000,
        endpoint=ep,
    )
    synth.write_collection(
        paths["scenes"],
        layout="scene",
        count=1,
        seed=config.seed + 2000,
        scene_size=config.scene_size,
        endpoint=ep,
    )
    return paths


def _run(config: DemoConfig, root: str, ep: str | None, echo: Callable[[str], None]) -> dict:
    from segray import synth
    from segray.augment import AugmentConfig
    from segray.evaluate import EvalConfig, evaluate
    from segray.predict import PredictConfig, predict
    from segray.runtime import init_ray
    from segray.train import TrainConfig, train

    start = time.monotonic()
    paths = _synthesise(config, root, ep, echo)
    init_ray(log_to_driver=True)
    run = storage.join(root, "run")
    echo(f"[2/5] training a small U-Net on {config.workers} Ray Train workers → {run}")
    result = train(
        TrainConfig(
            data=paths["data"],
            out=run,
            num_classes=len(synth.CLASSES),
            class_names=list(synth.CLASSES),
            size=config.size,
            epochs=config.epochs,
            batch_size=8,
            workers=config.workers,
            model_options={"base_filters": 8, "depth": 3},
            learning_rate=3e-3,
            schedule="cosine",
            augment=AugmentConfig(hue=0.0, brightness=0.0, gamma=0.0),
            seed=config.seed,
            endpoint=ep,
            max_failures=1,
        )
    )
    masks, scene_masks = storage.join(root, "masks"), storage.join(root, "scene_masks")
    echo(f"[3/5] bulk job on the held-out tiles → {masks}")
    tiles = predict(
        PredictConfig(
            model=run, input=storage.join(paths["heldout"], "images"), output=masks, endpoint=ep
        ),
        echo=echo,
    )
    echo(f"[4/5] bulk job on the scene, {config.size}px windows → {scene_masks}")
    scenes = predict(
        PredictConfig(
            model=run,
            input=storage.join(paths["scenes"], "scenes"),
            output=scene_masks,
            pattern="scene_???.tif",
            scene=True,
            overlap=16,
            endpoint=ep,
        ),
        echo=echo,
    )
    report_dir = storage.join(root, "eval")
    echo(f"[5/5] evaluating on the held-out tiles → {report_dir}")
    doc = evaluate(EvalConfig(model=run, data=paths["heldout"], out=report_dir, endpoint=ep))
    outputs = {
        "run": run,
        "curves": storage.join(run, "curves.png"),
        "masks": masks,
        "scene_masks": scene_masks,
        "manifests": [tiles.manifest, scenes.manifest],
        "report": storage.join(report_dir, "report.md"),
        "confusion": doc["confusion_png"],
        "overlays": [w["overlay"] for w in doc["worst"]],
        "mean_iou": doc["mean_iou"],
        "best_epoch": result.best_epoch,
        "seconds": round(time.monotonic() - start, 1),
    }
    storage.write_text(storage.join(root, "demo.json"), json.dumps(outputs, indent=2), endpoint=ep)
    _print_outputs(outputs, storage.read_text(outputs["report"], endpoint=ep), echo)
    return outputs


def _print_outputs(outputs: dict, report_md: str, echo: Callable[[str], None]) -> None:
    table = report_md.split("```")[1].strip() if "```" in report_md else ""
    echo("\nPer-class results on the held-out tiles:\n" + table)
    echo(
        f"\ndone in {outputs['seconds']} s. Outputs:\n"
        f"  model:      {outputs['run']}/model.keras (+ model.json, metrics.csv)\n"
        f"  curves:     {outputs['curves']}\n"
        f"  masks:      {outputs['masks']}\n"
        f"  scene mask: {outputs['scene_masks']}\n"
        f"  manifests:  {', '.join(outputs['manifests'])}\n"
        f"  report:     {outputs['report']} (confusion: {outputs['confusion']})\n"
        f"  overlays:   {', '.join(outputs['overlays'])}"
    )
