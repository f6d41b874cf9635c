"""`ray job submit` entrypoint for bulk prediction: the same options as `segray predict`.

    ray job submit --working-dir . -- python jobs/batch_predict.py \\
        --model s3://bucket/runs/r1 --input s3://bucket/tiles --output s3://bucket/masks \\
        --batch-size 32 --concurrency 2 --gpus-per-actor 1

Exits 1 when the share of tiles in error exceeds --max-error-rate (default 0).
"""

import sys

from segray.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["predict", *sys.argv[1:]], prog_name="jobs/batch_predict.py"))
