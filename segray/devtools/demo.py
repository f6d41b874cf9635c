"""The main job on the embedded default: synthetic scenes, local storage, tiny settings.

``make demo`` runs this end to end: synthesise a multi-class satellite collection (16-bit, six
bands, no-data corners, by default; ``--dtype uint8`` for 8-bit RGB), train a small U-Net on 2 Ray
Train workers, segment held-out GeoTIFF tiles and one large scene with the bulk
job, evaluate, and print where everything is. ``--s3`` does the same with every URI on s3://,
against a moto S3 server started on 127.0.0.1 for the run and stopped at the end.

The demo owns its output folder: a rerun replaces the outputs of the previous demo there (it
knows them by their ``demo.json``), and refuses a folder that holds anything else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Literal

from segray.errors import ConfigError
from segray.io import storage
from segray.settings import Settings, setting

log = logging.getLogger(__name__)
#: The file a finished (or started) demo leaves at the top of its folder.
MARKER = "demo.json"


class DemoConfig(Settings):
    """Settings of the demo; the defaults finish in a few minutes on 2 cores."""

    out: str = setting("runs/demo", "Folder for every output (replaced on a rerun).")
    use_s3: bool = setting(False, "Put every URI on a local moto S3 server.", flag="--s3")
    count: int = setting(160, "Synthetic training tiles.", ge=8)
    size: int = setting(64, "Tile size in pixels.", ge=32)
    epochs: int = setting(16, "Training epochs.", ge=1)
    workers: int = setting(2, "Ray Train workers.", ge=1)
    scene_size: int = setting(512, "Side of the synthetic scene in pixels.", ge=64)
    seed: int = setting(0, "Seed of the synthetic data and the training.")
    held_out: int = setting(16, "Held-out GeoTIFF tiles for the bulk job and evaluation.", ge=1)
    dtype: Literal["uint16", "uint8"] = setting(
        "uint16", "Pixel type: uint16 is reflectance x 10,000 with no-data corners (GeoTIFF)."
    )
    bands: Literal[3, 4, 6] | None = setting(
        None, "Bands: RGB, +NIR, +SWIR1 and SWIR2 (default 6 for uint16, 3 for uint8)."
    )

    def band_count(self) -> int:
        """The bands asked for, or the default of the pixel type."""
        return self.bands or (6 if self.dtype == "uint16" else 3)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo and return where everything is."""
    if not config.use_s3:
        _clear_previous(config.out)
        return _run(config, config.out, None)
    from segray.devtools.s3server import TEST_CREDENTIALS, MotoServer

    # Set before Ray starts, so the workers find the endpoint and credentials in their environment.
    saved = {k: os.environ.get(k) for k in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    with MotoServer() as server:
        try:
            os.environ.update(TEST_CREDENTIALS)
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            log.info("S3 mode: moto server at %s (stopped when the demo ends)", server.endpoint)
            root = "s3://segray-demo/demo"
            storage.filesystem(root).make_bucket(root)
            return _run(config, root, server.endpoint)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _clear_previous(out: str) -> None:
    """Empty a local demo folder left by an earlier demo; refuse one that holds other things."""
    path = storage.parse(out).path
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not os.path.exists(os.path.join(path, MARKER)):
        raise ConfigError(
            f"{out} is not empty and holds no earlier demo ({MARKER}): choose another --out"
        )
    shutil.rmtree(path)


def _synthesise(config: DemoConfig, root: str, ep: str | None) -> dict[str, str]:
    from segray.devtools import synth

    paths = {k: storage.join(root, k) for k in ("data", "heldout", "scenes")}
    log.info(
        "[1/5] synthesising %d training tiles, %d held-out GeoTIFF tiles and a %dpx scene "
        "(%s, %d bands)",
        config.count,
        config.held_out,
        config.scene_size,
        config.dtype,
        config.band_count(),
    )
    fs = storage.filesystem(root, ep)
    pixels = {"dtype": config.dtype, "bands": config.band_count(), "fs": fs}
    synth.write_collection(
        paths["data"],
        layout="paired" if config.dtype == "uint8" else "geotiff",  # 16-bit needs GeoTIFF
        count=config.count,
        size=config.size,
        seed=config.seed,
        **pixels,
    )
    synth.write_collection(
        paths["heldout"],
        layout="geotiff",
        count=config.held_out,
        size=config.size,
        seed=config.seed + 1000,
        **pixels,
    )
    synth.write_collection(
        paths["scenes"],
        layout="scene",
        count=1,
        seed=config.seed + 2000,
        scene_size=config.scene_size,
        **pixels,
    )
    return paths


def _run(config: DemoConfig, root: str, ep: str | None) -> dict[str, Any]:
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.devtools import synth
    from segray.evaluate.evaluate import EvalConfig, evaluate
    from segray.runtime import init_ray
    from segray.train.augment import AugmentConfig
    from segray.train.config import TrainConfig
    from segray.train.driver import train

    start = time.monotonic()
    fs = storage.filesystem(root, ep)
    fs.write_text(storage.join(root, MARKER), "{}")  # claims the folder
    paths = _synthesise(config, root, ep)
    init_ray()
    run = storage.join(root, "run")
    log.info("[2/5] training a small U-Net on %d Ray Train workers", config.workers)
    result = train(
        TrainConfig(
            data=paths["data"],
            out=run,
            num_classes=len(synth.CLASSES),
            class_names=synth.CLASSES,
            size=config.size,
            epochs=config.epochs,
            batch_size=8,
            workers=config.workers,
            model_options={"base_filters": 8, "depth": 3},
            learning_rate=3e-3,
            schedule="cosine",
            augment=AugmentConfig(hue=0.0, brightness=0.0, contrast=0.0),
            seed=config.seed,
            endpoint=ep,
            max_failures=1,
        )
    )
    log.info(result.summary())
    masks, scene_masks = storage.join(root, "masks"), storage.join(root, "scene_masks")
    log.info("[3/5] bulk job on the held-out tiles")
    tiles = predict(
        PredictConfig(
            model=run,
            input=storage.join(paths["heldout"], "images"),
            output=masks,
            endpoint=ep,
            vectors=storage.join(masks, "buildings.parquet"),
            vector_classes=(BUILDING,),
        )
    )
    log.info("[4/5] bulk job on the scene, %dpx windows", config.size)
    scenes = predict(
        PredictConfig(
            model=run,
            input=storage.join(paths["scenes"], "scenes"),
            output=scene_masks,
            pattern="scene_???.tif",
            scene=True,
            overlap=16,
            endpoint=ep,
            vectors=storage.join(scene_masks, "buildings.parquet"),
            vector_classes=(BUILDING,),
        )
    )
    report_dir = storage.join(root, "eval")
    log.info("[5/5] evaluating on the held-out tiles")
    doc = evaluate(EvalConfig(model=run, data=paths["heldout"], out=report_dir, endpoint=ep))
    objects = _object_scores(paths["scenes"], scene_masks, report_dir, ep)
    outputs = {
        "run": run,
        "curves": storage.join(run, "curves.png"),
        "masks": masks,
        "scene_masks": scene_masks,
        "scenes": storage.join(paths["scenes"], "scenes"),
        "scene": storage.join(paths["scenes"], "scenes", "scene_000.tif"),
        "manifests": [tiles.manifest, scenes.manifest],
        "report": storage.join(report_dir, "report.md"),
        "confusion": doc["confusion_png"],
        "overlays": storage.join(report_dir, "worst"),
        "mean_iou": doc["mean_iou"],
        "vectors": [storage.join(masks, "buildings.parquet"), objects["layer"]],
        "building_f1": objects["f1"],
        "best_epoch": result.best_epoch,
        "seconds": round(time.monotonic() - start, 1),
    }
    fs.write_text(storage.join(root, MARKER), json.dumps(outputs, indent=2))
    log.info(_outputs_text(outputs, fs.read_text(outputs["report"])))
    return outputs


def _outputs_text(outputs: dict[str, Any], report_md: str) -> str:
    table = report_md.split("```")[1].strip() if "```" in report_md else ""
    return (
        f"\nPer-class results on the held-out tiles:\n{table}\n"
        f"\ndone in {outputs['seconds']} s. Outputs:\n"
        f"  model:      {outputs['run']}/model.keras (+ model.json, config.yaml, metrics.csv)\n"
        f"  curves:     {outputs['curves']}\n"
        f"  masks:      {outputs['masks']}\n"
        f"  scene mask: {outputs['scene_masks']}\n"
        f"  manifests:  {outputs['masks']}/_manifest, {outputs['scene_masks']}/_manifest\n"
        f"  report:     {outputs['report']} (confusion: {outputs['confusion']})\n"
        f"  overlays:   {outputs['overlays']}/\n"
        f"  buildings:  {outputs['vectors'][0]}, {outputs['vectors'][1]} (one layer per job;\n"
        f"              the scene's object F1 at IoU 0.5: {outputs['building_f1']:.3f})\n"
        f"\nLook at it on a map (then open the URL it prints):\n"
        f"  segray serve --model {outputs['run']} --allow-source {outputs['scenes']}\n"
        f"  http://127.0.0.1:8000/v1/map?url={outputs['scene']}"
    )


#: The synthetic collections' building class.
BUILDING = 1


def _object_scores(scenes: str, scene_masks: str, report_dir: str, ep: str | None) -> dict:
    """The scene job's building layer against the scene's true buildings (traced from its
    truth raster into a GeoJSON beside the report), object by object."""
    from segray.evaluate.evaluate import EvalConfig, evaluate_layer
    from segray.io import footprints, imagery

    truth = imagery.decode(
        storage.read_bytes(storage.join(scenes, "scenes", "scene_000_mask.tif"), endpoint=ep)
    )
    doc = footprints.footprints(
        truth.array[..., 0], BUILDING, transform=truth.transform, crs=truth.crs
    )
    labels = storage.join(report_dir, "buildings_truth.geojson")
    storage.filesystem(labels, ep).write_text(labels, json.dumps(doc))
    layer = storage.join(scene_masks, "buildings.parquet")
    config = EvalConfig(
        vectors=layer, labels=labels, out=storage.join(report_dir, "objects"), endpoint=ep
    )
    return {"layer": layer, **evaluate_layer(config)}
