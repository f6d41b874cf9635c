"""Checkpoints of a training run: what one holds (model, model card, optimiser state, loop state),
writing and restoring them, and finding the newest complete one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from segray.io import storage
from segray.models.saving import CARD_FILE, MODEL_FILE, ModelCard, save_model

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.npz"


def weights_checksum(model: Any) -> str:
    """A hash of every weight's bytes: equal on two replicas only if they are bit-identical."""
    import hashlib

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def restore(checkpoint: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """Load weights, optimiser state and the loop state of a checkpoint into live objects."""
    from segray.models.registry import load_keras

    with checkpoint.as_directory() as folder:
        saved = load_keras(os.path.join(folder, MODEL_FILE))
        model.set_weights(saved.get_weights())
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        opt_path = os.path.join(folder, OPTIMIZER_FILE)
        if os.path.exists(opt_path):
            arrays = np.load(opt_path)
            optimizer.build(model.trainable_variables)
            for i, var in enumerate(optimizer.variables):
                var.assign(arrays[f"v{i}"])
    return state


def save(model: Any, optimizer: Any, card: ModelCard, state: dict[str, Any]) -> str:
    """A local folder holding a whole checkpoint, for ``ray.train.Checkpoint.from_directory``."""
    folder = tempfile.mkdtemp(prefix="segray-ckpt-")
    save_model(model, card, folder)
    np.savez(
        os.path.join(folder, OPTIMIZER_FILE),
        **{f"v{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)},
    )
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)
    return folder


def latest_checkpoint(out: str, endpoint: str | None) -> Any:
    """The newest complete ``epoch_NNNN`` checkpoint under a run folder, or None.

    Ray Train hands restarted workers its latest registered checkpoint, but a worker lost right
    after a report can beat the registration (seen with Ray 2.60): the folders themselves are the
    record, and one counts only when all its files are there.
    """
    files = set(storage.list_files(out, pattern="epoch_*/*", endpoint=endpoint))
    folders = sorted({f.rsplit("/", 1)[0] for f in files}, reverse=True)
    needed = (MODEL_FILE, CARD_FILE, OPTIMIZER_FILE, STATE_FILE)
    for folder in folders:
        if all(storage.join(folder, name) in files for name in needed):
            return checkpoint_from_uri(folder, endpoint)
    return None


def checkpoint_from_uri(uri: str, endpoint: str | None) -> Any:
    """A Ray Train checkpoint of a folder, local or s3://."""
    import ray.train

    if storage.is_s3(uri):
        fs, path = storage.pyarrow_filesystem(uri, endpoint=endpoint)
        return ray.train.Checkpoint(path=path, filesystem=fs)
    return ray.train.Checkpoint.from_directory(storage.parse(uri).path)


def has_checkpoints(out: str, endpoint: str | None) -> bool:
    """True when a run folder holds a checkpoint of some epoch."""
    return any(
        u.endswith(STATE_FILE)
        for u in storage.list_files(out, pattern=f"*{STATE_FILE}", endpoint=endpoint)
    )


def read_state(checkpoint: Any) -> dict[str, Any]:
    """The loop state (epoch, history, early stopping) of a checkpoint."""
    with checkpoint.as_directory() as folder, open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def copy_checkpoint(checkpoint: Any, dest: str, endpoint: str | None) -> None:
    """Copy a checkpoint's model and card to ``dest`` (the run folder, or its ``last/``)."""
    with checkpoint.as_directory() as folder:
        for name in (MODEL_FILE, CARD_FILE):
            with open(f"{folder}/{name}", "rb") as f:
                storage.write_bytes(storage.join(dest, name), f.read(), endpoint=endpoint)
