"""Checkpoints of a training run: what one holds (model, model card, optimiser state, loop state),
writing and restoring them, and finding the newest complete one."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from segray.errors import ModelError
from segray.io import storage
from segray.io.files import FileSystem
from segray.models.saving import CARD_FILE, MODEL_FILE, ModelCard, save_model

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.npz"

log = logging.getLogger(__name__)


def weights_checksum(model: Any) -> str:
    """A hash of every weight's bytes: equal on two replicas only if they are bit-identical."""
    import hashlib

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def restore(checkpoint: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """Load weights, optimiser state and the loop state of a checkpoint into live objects.

    Everything is read and checked before anything is assigned, so a checkpoint that fails to
    load leaves the model and optimiser as they were (and the caller can try an older one).
    """
    from segray.models.registry import load_keras

    with checkpoint.as_directory() as folder:
        weights = load_keras(os.path.join(folder, MODEL_FILE)).get_weights()
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        opt_path = os.path.join(folder, OPTIMIZER_FILE)
        arrays = None
        if os.path.exists(opt_path):
            with np.load(opt_path) as npz:
                arrays = [npz[f"v{i}"] for i in range(len(npz.files))]
    shapes = [tuple(w.shape) for w in model.get_weights()]
    if [tuple(w.shape) for w in weights] != shapes:
        raise ValueError("its model's weights do not match this model's shapes")
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ValueError(f"{STATE_FILE} holds no epoch")
    if arrays is not None:
        optimizer.build(model.trainable_variables)
        if len(arrays) != len(optimizer.variables):
            raise ValueError(
                f"{OPTIMIZER_FILE} holds {len(arrays)} arrays, not {len(optimizer.variables)}"
            )
    model.set_weights(weights)
    if arrays is not None:
        for var, value in zip(optimizer.variables, arrays, strict=True):
            var.assign(value)
    return state


def restore_newest(
    candidates: Sequence[tuple[str, Any]], model: Any, optimizer: Any
) -> tuple[dict[str, Any], str, list[str]]:
    """Restore the first of ``(name, checkpoint)`` candidates (newest first) that loads whole.

    Returns ``(state, name used, reasons the newer ones were passed over)``; raises
    :class:`ModelError` naming each candidate and why when none loads.
    """
    passed: list[str] = []
    for name, checkpoint in candidates:
        try:
            return restore(checkpoint, model, optimizer), name, passed
        except Exception as exc:
            passed.append(f"{name}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            log.warning("checkpoint %s cannot be restored (%s); trying an older one", name, exc)
    raise ModelError("no checkpoint could be restored: " + "; ".join(passed))


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


def checkpoint_name(epoch: int, start: int) -> str:
    """The folder of an epoch's checkpoint: ``epoch_NNNN`` in a run's first start, and
    ``epoch_NNNN.rKK`` in its KK-th (a resumed or restarted run may report again an epoch that an
    earlier start saved; a name of its own keeps Ray Train, which deletes checkpoints beyond the
    two it keeps, from deleting the new one as the old)."""
    return f"epoch_{epoch:04d}" + (f".r{start:02d}" if start > 1 else "")


def _age(folder: str) -> tuple[int, int]:
    """``(epoch, start)`` of a checkpoint folder named by :func:`checkpoint_name`."""
    name = folder.rsplit("/", 1)[-1].removeprefix("epoch_")
    epoch, _, start = name.partition(".r")
    if not epoch.isdigit() or not (start.isdigit() or not start):
        return (-1, 0)  # not a checkpoint of this run's naming: oldest
    return int(epoch), int(start or 1)


def complete_checkpoints(out: str, fs: FileSystem | None = None) -> list[str]:
    """The complete ``epoch_NNNN[.rKK]`` checkpoint folders under a run folder, newest first.

    Ray Train hands restarted workers its latest registered checkpoint, but a worker lost right
    after a report can beat the registration (seen with Ray 2.60): the folders themselves are the
    record, and one counts only when all its files are there.
    """
    files = set((fs or storage.filesystem(out)).list_files(out, pattern="epoch_*/*"))
    folders = sorted({f.rsplit("/", 1)[0] for f in files}, key=_age, reverse=True)
    needed = (MODEL_FILE, CARD_FILE, OPTIMIZER_FILE, STATE_FILE)
    return [d for d in folders if all(storage.join(d, name) in files for name in needed)]


def checkpoint_from_uri(uri: str, fs: FileSystem | None = None) -> Any:
    """A Ray Train checkpoint of a folder, local or s3://."""
    import ray.train

    fs = fs or storage.filesystem(uri)
    if fs.scheme != "file":
        arrow, path = fs.arrow(uri)
        return ray.train.Checkpoint(path=path, filesystem=arrow)
    return ray.train.Checkpoint.from_directory(storage.parse(uri).path)


def has_checkpoints(out: str, fs: FileSystem | None = None) -> bool:
    """True when a run folder holds a checkpoint of some epoch."""
    listed = (fs or storage.filesystem(out)).list_files(out, pattern=f"*{STATE_FILE}")
    return any(u.endswith(STATE_FILE) for u in listed)


def read_state(checkpoint: Any) -> dict[str, Any]:
    """The loop state (epoch, history, early stopping) of a checkpoint."""
    with checkpoint.as_directory() as folder, open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def copy_checkpoint(checkpoint: Any, dest: str, fs: FileSystem | None = None) -> None:
    """Copy a checkpoint's model and card to ``dest`` (the run folder, or its ``last/``)."""
    fs = fs or storage.filesystem(dest)
    with checkpoint.as_directory() as folder:
        for name in (MODEL_FILE, CARD_FILE):
            fs.write_file(storage.join(dest, name), f"{folder}/{name}")


#: Ray Train's record of a run's checkpoints, in the run folder.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def flaw(folder: str, fs: FileSystem) -> str | None:
    """Why a complete checkpoint folder cannot be restored, read on the driver without Keras
    (every file read whole: a torn model, card, optimiser or loop state), or None."""
    import io
    import zipfile

    from segray.models.vetting import vet_file

    def where(name: str) -> str:
        return storage.join(folder, name)

    try:
        card = ModelCard.from_json(fs.read_text(where(CARD_FILE)), where(CARD_FILE))
        data = fs.read_bytes(where(MODEL_FILE))
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            broken = archive.testzip()
        if broken:
            return f"{where(MODEL_FILE)}: {broken} is corrupt"
        vet_file(data, card, where(MODEL_FILE), where(CARD_FILE))
        with np.load(io.BytesIO(fs.read_bytes(where(OPTIMIZER_FILE)))) as arrays:
            for key in arrays.files:
                arrays[key]  # noqa: B018 - read whole: a torn array fails here
        state = json.loads(fs.read_text(where(STATE_FILE)))
        if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
            return f"{where(STATE_FILE)}: no epoch"
    except zipfile.BadZipFile as exc:
        return f"{where(MODEL_FILE)}: {exc}"
    except (ModelError, OSError, ValueError, KeyError, EOFError) as exc:
        return f"{folder}: {type(exc).__name__}: {str(exc).strip()[:200]}"
    return None


def check_resume(out: str, fs: FileSystem) -> tuple[str, list[str]]:
    """Before ``--resume`` starts any worker: the newest checkpoint folder that can be restored
    and why each newer one cannot (:func:`flaw`); :class:`ModelError` naming each folder and why
    when none can. Ray Train's record of the run's checkpoints is set aside (renamed, not deleted)
    when it names a folder that is gone: Ray Train would refuse the whole run folder as
    corrupted, where the loop restores from the folders themselves."""
    from segray.errors import ConfigError

    folders = complete_checkpoints(out, fs)
    if not folders:
        raise ConfigError(f"--resume: no complete checkpoint under {out}")
    passed: list[str] = []
    good = None
    for folder in folders:
        why = flaw(folder, fs)
        if why is None:
            good = folder
            break
        passed.append(why)
    if good is None:
        raise ModelError(f"--resume: no checkpoint of {out} can be restored: " + "; ".join(passed))
    snapshot = storage.join(out, RAY_SNAPSHOT)
    if fs.exists(snapshot):
        try:
            results = json.loads(fs.read_text(snapshot)).get("checkpoint_results", [])
            names = [r.get("checkpoint_dir_name") for r in results]
        except (ValueError, AttributeError):
            names = [None]
        gone = [n for n in names if not n or not fs.exists(storage.join(out, n, STATE_FILE))]
        if gone:
            fs.write_bytes(f"{snapshot}.stale", fs.read_bytes(snapshot))
            fs.delete(snapshot)
            gone_names = ", ".join(map(str, gone))
            log.warning("%s names checkpoints that are gone (%s): set aside", snapshot, gone_names)
    return good, passed
