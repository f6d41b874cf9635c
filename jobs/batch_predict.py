"""`ray job submit` entrypoint for bulk prediction: the same options as `segray predict`.

    ray job submit --working-dir . -- python jobs/batch_predict.py \\
        --model s3://bucket/runs/r1 --input s3://bucket/tiles --output s3://bucket/masks \\
        --batch-size 32 --concurrency 2 --gpus-per-actor 1

Exits 1 when the share of tiles in error exceeds --max-error-rate (default 0).
"""

from __future__ import annotations

import argparse
import sys

from segray.predict import PredictConfig, predict


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",") if b.strip())


def _strings(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def build_parser() -> argparse.ArgumentParser:
    """The options, each named after its :class:`PredictConfig` field."""
    p = argparse.ArgumentParser(prog="jobs/batch_predict.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Run folder, model folder or .keras file.")
    p.add_argument("--input", default="", help="Folder or s3:// prefix (or one file) of tiles.")
    p.add_argument("--output", required=True, help="Folder or s3:// prefix for the masks.")
    p.add_argument("--manifest", default=None, help="Parquet/text file listing input URIs.")
    p.add_argument("--s3-endpoint", dest="endpoint", default=None, help="S3 endpoint URL.")
    p.add_argument("--pattern", default=None, help="Glob on the relative path or file name.")
    p.add_argument("--suffixes", type=_strings, default=None, help="e.g. .tif,.png")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1, help="Predictor actors.")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--cpus-per-task", type=float, default=0.5, help="Per read/write task.")
    p.add_argument("--output-mode", choices=("classes", "binary", "probability"), default="classes")
    p.add_argument("--class-index", type=int, default=1)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--bands", type=_ints, default=None, help="1-based bands, e.g. 1,2,3.")
    p.add_argument("--overwrite", action="store_true", help="Redo tiles whose mask exists.")
    p.add_argument("--max-error-rate", type=float, default=0.0)
    p.add_argument("--scene", action="store_true", help="Inputs are large GeoTIFF scenes.")
    p.add_argument("--window", type=int, default=None, help="Scene window (default: model input).")
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--blend", choices=("linear", "cosine", "crop"), default="cosine")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS).")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the job, return the exit status."""
    args = build_parser().parse_args(argv)
    result = predict(PredictConfig(**vars(args)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
