"""What segray tells a person while it works: named loggers, one verbosity, progress bars.

``configure(verbosity)`` is called once by the CLI (``-q`` = -1, default 0, ``-v`` = 1, ``-vv`` =
2). At 0 a person sees segray's own steps and bars; Ray's chatter (its INFO logs, worker output,
Ray Data's per-operator progress logs, Ray Train's per-report dumps) is hidden unless ``-v``.
Library code logs through ``logging.getLogger("segray.<module>")`` and never prints.

Native libraries write to file descriptor 2 behind Python's back: TensorFlow's absl start-up lines
(some before ``TF_CPP_MIN_LOG_LEVEL`` is read) and Ray's C++ core worker (for example its note on
every Ray Data actor that "has constructor arguments in the object store", ray-project/ray#53727).
:func:`filter_native_stderr` (the console script calls it) puts a filter between those and the
terminal: their log lines pass only when verbose; everything else, Python's own stderr included,
passes as it is.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import sys
import threading
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


#: A native library's log line: absl/glog (``I0000 00:00:… 123 file.cc:45]``), Ray's C++ logger
#: (``[2026-01-01 00:00:00,000 E 1 1] file.cc:45:``) and absl's note before it is initialised.
NATIVE_LINE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IWEF]\d{4} \d+:\d+:\d+\.\d+ +\d+ [\w.-]+:\d+\]"
    rb"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] [\w.-]+:\d+:)"
)


def filter_native_stderr() -> None:
    """Route file descriptor 2 through a filter that drops native log lines unless verbose.

    Python's ``sys.stderr`` keeps writing to the terminal itself (a duplicate of the original
    descriptor), so progress bars still see a terminal and tracebacks are never held back; only
    what C/C++ code writes to descriptor 2 goes through the pipe. Called once, by the console
    script only: a test runner's own capture of descriptor 2 is never touched.
    """
    if getattr(filter_native_stderr, "_installed", False):
        return
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except OSError:
        return
    filter_native_stderr._installed = True  # type: ignore[attr-defined]
    sys.stderr = io.TextIOWrapper(
        os.fdopen(os.dup(terminal), "wb", buffering=0),
        encoding="utf-8",
        errors="replace",
        line_buffering=True,
    )
    thread = threading.Thread(target=_forward, args=(read, terminal), daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
            os.dup2(terminal, 2)  # closes this process's end of the pipe: the thread sees EOF
        except OSError:
            return
        thread.join(timeout=1.0)

    atexit.register(restore)


def _forward(read: int, terminal: int) -> None:
    """Copy lines from the pipe to the terminal, leaving out native log lines unless verbose."""
    pending = b""
    while True:
        try:
            chunk = os.read(read, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _emit(line + b"\n", terminal)
    if pending:
        _emit(pending, terminal)
    os.close(read)


def _emit(line: bytes, terminal: int) -> None:
    if verbosity() >= 1 or not NATIVE_LINE.match(line):
        try:
            os.write(terminal, line)
        except OSError:
            pass
