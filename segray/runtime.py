"""Connecting to Ray the way every segray entry point does.

The S3 endpoint and AWS credentials of the driver are forwarded to every Ray worker through the
job's runtime environment, so tasks and actors reach the same object store as the driver without
per-node configuration. On a real cluster the nodes' own credential chain still applies when the
driver has nothing to forward.
"""

from __future__ import annotations

import os
from typing import Any

#: Environment variables handed from the driver to Ray workers.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
)


def forwarded_env() -> dict[str, str]:
    """The driver's AWS settings that workers should see."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Start or join Ray once, forwarding AWS settings to workers; returns the ``ray`` module.

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
    if env_vars:
        runtime_env["env_vars"] = env_vars
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("configure_logging", False)
    for key, value in log.ray_init_options().items():
        kwargs.setdefault(key, value)
    if address is None:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env or None, **kwargs)
    else:
        ray.init(address=address, runtime_env=runtime_env or None, **kwargs)
    log.quiet_ray()
    return ray
