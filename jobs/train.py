"""`ray job submit` entrypoint for training: the same options as `segray train`.

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/tiles \\
        --model unet --classes 5 --size 128 --epochs 20 --workers 2 --out s3://bucket/runs/r1
"""

import sys

from segray.cli import cli

if __name__ == "__main__":
    sys.exit(cli(["train", *sys.argv[1:]], prog_name="jobs/train.py"))
