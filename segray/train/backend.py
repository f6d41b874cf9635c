"""Ray Train's backend for segray's TensorFlow workers, with no TensorFlow outside them.

``TensorflowTrainer`` is a ``DataParallelTrainer`` whose backend writes each worker's
``TF_CONFIG`` (the group's addresses and the worker's index), which
``tf.distribute.MultiWorkerMirroredStrategy`` reads. Its config class lives in a package that
imports TensorFlow on import, and Ray Train's controller actor unpickles it: every run paid a
third TensorFlow import (about 4 s of CPU, measured with ``-X importtime``) in a process that never
trains, beside the two workers importing theirs. This backend does the same thing from a module
that imports only Ray, so TensorFlow is imported where it runs: on the workers (and the driver,
which builds the model to check it).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig


def _address() -> str:
    """This worker's ``host:port``, the port free now, for TensorFlow's collective ops."""
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _set_tf_config(workers: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )


class _MultiWorkerBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        workers = worker_group.execute(_address)  # in rank order
        ray.get(
            [
                worker_group.execute_single_async(rank, _set_tf_config, workers, rank)
                for rank in range(len(workers))
            ]
        )


@dataclass
class MultiWorkerConfig(BackendConfig):
    """The backend config of segray's trainer: ``TF_CONFIG`` on every worker, as
    ``TensorflowConfig`` writes it, without importing TensorFlow where it is unpickled."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _MultiWorkerBackend
