"""The main job on the embedded default: synthetic tiles, local storage, tiny settings.

``make demo`` runs this. It grows with the product: today it synthesises a multi-class satellite
collection, loads it as a Ray Dataset, prints a summary and saves a preview picture.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from segray import imagery, storage


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in well under a minute on 2 cores."""

    out: str = "runs/demo"
    use_s3: bool = False
    count: int = 24
    size: int = 64
    seed: int = 0
    scene_size: int = 512


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the demo; with ``use_s3`` every URI lives on a moto S3 server started for the run."""
    if not config.use_s3:
        return _run(config, config.out, None, echo)
    from segray.s3server import TEST_CREDENTIALS, MotoServer

    # Set before Ray starts, so init_ray forwards the endpoint and credentials to the workers.
    saved = {k: os.environ.get(k) for k in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    with MotoServer() as server:
        try:
            os.environ.update(TEST_CREDENTIALS)
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            echo(f"S3 mode: moto server at {server.endpoint}")
            root = "s3://segray-demo/demo"
            storage.make_bucket(root)
            return _run(config, root, server.endpoint, echo)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _run(config: DemoConfig, root: str, endpoint: str | None, echo: Callable[[str], None]) -> dict:
    from segray import datasets, report, synth
    from segray.runtime import init_ray

    start = time.monotonic()
    data = storage.join(root, "data")
    echo(f"[1/3] synthesising {config.count} tiles of {config.size}px into {data}")
    summary = synth.write_collection(
        data,
        layout="paired",
        count=config.count,
        size=config.size,
        seed=config.seed,
        endpoint=endpoint,
    )
    scenes = storage.join(root, "scenes")
    synth.write_collection(
        root,
        layout="scene",
        count=1,
        seed=config.seed,
        scene_size=config.scene_size,
        endpoint=endpoint,
    )
    echo("[2/3] loading the collection as a Ray Dataset (train/val split)")
    init_ray(log_to_driver=False)
    spec = datasets.DatasetSpec(
        data, "paired", num_classes=len(synth.CLASSES), seed=config.seed, endpoint=endpoint
    )
    train, val, info = datasets.load_splits(spec)
    n_val = val.count() if val is not None else 0
    echo(
        f"      {info.count} tiles ({info.count - n_val} train / {n_val} val), "
        f"image shape {info.image_shape}"
    )
    for name, frac in zip(synth.CLASSES, info.class_fractions(), strict=False):
        echo(f"      {name:<11} {frac:6.1%} of pixels")
    echo("[3/3] saving a preview (image | mask)")
    rows = [(r["image"], r["mask"]) for r in train.take(4)]
    preview = storage.join(root, "preview.png")
    storage.write_bytes(
        preview, imagery.encode_png(report.overlay_grid(rows, synth.PALETTE)), endpoint=endpoint
    )
    result = {
        "data": data,
        "scenes": scenes,
        "preview": preview,
        "tiles": info.count,
        "class_fractions": dict(zip(synth.CLASSES, info.class_fractions(), strict=False)),
        "seconds": round(time.monotonic() - start, 1),
        "synth": summary,
    }
    storage.write_text(
        storage.join(root, "demo.json"),
        json.dumps(result, indent=2, default=str),
        endpoint=endpoint,
    )
    echo(
        f"done in {result['seconds']} s. Outputs:\n  data:    {data}\n  scenes:  {scenes}\n"
        f"  preview: {preview}\n  summary: {storage.join(root, 'demo.json')}"
    )
    return result
