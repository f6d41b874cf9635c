"""What segray tells a person while it works: named loggers, one verbosity, progress bars.

``configure(verbosity)`` is called once by the CLI (``-q`` = -1, default 0, ``-v`` = 1, ``-vv`` =
2). At 0 a person sees segray's own steps and bars; Ray's chatter (its INFO logs, worker output,
Ray Data's per-operator progress logs, Ray Train's per-report dumps) is hidden unless ``-v``.
Library code logs through ``logging.getLogger("segray.<module>")`` and never prints.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

#: Loggers of Ray and its libraries that speak at INFO about every dataset, report and actor.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "filelock")
#: Environment variable that carries the verbosity to Ray workers and `ray job` entrypoints.
VERBOSITY_ENV = "SEGRAY_VERBOSITY"


def verbosity() -> int:
    """The verbosity in force: -1 quiet, 0 normal, 1 verbose, 2 debug."""
    try:
        return int(os.environ.get(VERBOSITY_ENV, "0"))
    except ValueError:
        return 0


def configure(level: int = 0) -> None:
    """Set segray's and Ray's log levels for a person at a terminal (see the module docstring)."""
    os.environ[VERBOSITY_ENV] = str(level)
    own = {-1: logging.WARNING, 0: logging.INFO}.get(level, logging.DEBUG)
    logger = logging.getLogger("segray")
    logger.setLevel(own)
    if not any(getattr(h, "_segray", False) for h in logger.handlers):
        handler = _TqdmHandler()
        handler._segray = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    quiet_ray()
    if level < 1:
        # TensorFlow's C++ start-up notes (CUDA probes, CPU features) go to stderr of every process;
        # Ray Data reads its log level from the environment when it is first imported.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def quiet_ray() -> None:
    """Hide Ray's INFO chatter unless verbose; safe to call again after Ray reconfigures."""
    ray_level = logging.INFO if verbosity() >= 1 else logging.WARNING
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(ray_level)


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` at the verbosity in force: worker output and Ray's own
    INFO logs reach the terminal only when verbose."""
    verbose = verbosity() >= 1
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw: Any) -> Any:
    """A progress bar on stderr (tqdm); silent when quiet or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = verbosity() < 0 or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, **kw)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never take the job down
            self.handleError(record)
