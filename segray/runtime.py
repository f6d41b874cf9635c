"""Connecting to Ray the way every segray entry point does.

The driver's S3 endpoint and region (not secrets) are forwarded to every Ray worker through the
job's runtime environment, so tasks and actors reach the same object store as the driver.
Credentials never go that way: Ray shows a job's runtime environment on its dashboard and writes
it to logs (ray-project/ray#28276, #39502). Workers take credentials from their node: the
environment Ray was started in (a local Ray started by segray inherits the driver's), a profile
or an instance role, or the secret the KubeRay manifests mount on every pod.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Environment variables handed from the driver to Ray workers: where S3 is and how long to wait
#: for it, never who you are.
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "SEGRAY_S3_RETRY_S",
)
#: Variables that must never reach a runtime environment.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Ray Train settings where this process started its own Ray: one machine, which no autoscaler
#: drains, so Ray Train's preemption watcher (an actor polling for drains, 1-3 s of CPU to start
#: beside the first epochs) has nothing to watch; and its controller polls the workers every
#: 0.5 s rather than 2 s (a call to a local actor; from the last report to ``fit()`` returning
#: took 4.1-5.0 s at 2 s, 1.4-1.9 s at 0.5 s). Ray Train reads them when ``fit()`` starts.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

_started_here = False


def forwarded_env() -> dict[str, str]:
    """The driver's non-secret AWS settings that workers should see."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Start or join Ray once, forwarding the S3 endpoint and region to workers; returns ``ray``.

    On a single small machine Ray is given at least 4 logical CPUs: Train workers that hold one CPU
    each otherwise leave none for Ray Data's read tasks, and the job waits forever.
    """
    import ray

    from segray import log

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None and num_cpus is None:
        num_cpus = max(4, os.cpu_count() or 1)
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    quiet = {
        k: os.environ[k] for k in (log.VERBOSITY_ENV, "TF_CPP_MIN_LOG_LEVEL") if k in os.environ
    }
    env_vars = {**forwarded_env(), **quiet, **runtime_env.get("env_vars", {})}
    for key in SECRET_ENV:
        env_vars.pop(key, None)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("configure_logging", False)
    for key, value in log.ray_init_options().items():
        kwargs.setdefault(key, value)
    global _started_here
    if address is None:  # with num_cpus given, ray.init refuses to join a running instance
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env or None, **kwargs)
    else:
        ray.init(address=address, runtime_env=runtime_env or None, **kwargs)
    _started_here = address is None
    log.quiet_ray()
    return ray


def started_here() -> bool:
    """True when :func:`init_ray` started the Ray this process is connected to (a one-machine
    instance of its own), False when it joined one."""
    return _started_here


@contextmanager
def train_env(local: bool | None = None) -> Iterator[None]:
    """The environment Ray Train reads at ``fit()``: :data:`LOCAL_TRAIN_ENV` on a Ray this process
    started (or, given ``local``, one its caller knows to be such: a Tune trial on the Ray that
    ``segray tune`` started) — what the user set wins; nothing on a joined cluster; restored on
    the way out."""
    local = LOCAL_TRAIN_ENV if (started_here() if local is None else local) else {}
    added = {k: v for k, v in local.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def join_cluster(address: str | None = None) -> Any:
    """Join a running Ray cluster — ``address``, else ``RAY_ADDRESS``, else the one ``ray start``
    left on this machine — and never start one: what lives there (a Predictor pool) must outlive
    this process. Returns ``ray``."""
    import ray

    from segray.errors import ConfigError

    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        _listening(where)  # Ray would retry an address where nothing listens for minutes
        return init_ray(address=where)
    except OSError as exc:  # ConnectionError, or a timeout
        raise ConfigError(
            f"no running Ray cluster at {where} (Predictor pools live on one): start it with "
            f"`ray start --head`, or give --ray-address / RAY_ADDRESS ({exc})"
        ) from None


def _listening(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`ConnectionError` at once when nothing listens at a ``host:port`` address."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", or a client URL: Ray's own lookup
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


#: Values fetched from Ray's object store by :class:`Shared`, the most recent kept per process.
_RESOLVED: OrderedDict[str, Any] = OrderedDict()
RESOLVED_KEPT = 8


class Shared:
    """A value many tasks need (a tile list, a scene's labels), put once in Ray's object store by
    :meth:`share`: it then pickles as its reference and is fetched once per process (the last
    :data:`RESOLVED_KEPT` kept), instead of travelling inside every task's function."""

    def __init__(self, value: Any) -> None:
        self._value, self._ref = value, None

    def share(self, keep: bool = True) -> Shared:
        """Put the value in the object store (once); ``keep=False`` lets this copy go."""
        import ray

        if self._ref is None:
            self._ref = ray.put(self._value)
        if not keep:
            self._value = None
        return self

    def key(self) -> str:
        """What names this value in every process: its reference (shared), else its identity."""
        return self._ref.hex() if self._ref is not None else f"local-{id(self._value)}"

    def get(self) -> Any:
        """The value: this copy's, else the process's cached fetch of the reference."""
        if self._value is not None:
            return self._value
        key = self._ref.hex()
        if key in _RESOLVED:
            _RESOLVED.move_to_end(key)
        else:
            import ray

            _RESOLVED[key] = ray.get(self._ref)
            while len(_RESOLVED) > RESOLVED_KEPT:
                _RESOLVED.popitem(last=False)
        return _RESOLVED[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"_value": None if self._ref is not None else self._value, "_ref": self._ref}
