"""Experiment tracking in MLflow, when a run asks for it (``--tracking-uri``).

A :class:`Tracker` logs a training run's settings as parameters when it starts, each epoch's
metrics as it finishes (step = epoch), and at the end the run folder's card, config, metrics and
curves and the best model as artifacts, then registers that model as a new version of a
registered model. Nothing is logged when no tracking URI is given, and a tracking server that is
down or fails never fails the training: the tracker warns once and goes on without it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from segray.io import storage

log = logging.getLogger("segray.train")
#: Seconds a tracking call may wait on the server, and its retries: a server that went away
#: costs the run seconds, not MLflow's default minutes of back-off.
TIMEOUT_S, RETRIES = 10, 1
#: The run folder's files logged as artifacts (besides the model, logged under ``model/``).
RUN_FILES = ("model.json", "config.yaml", "metrics.csv", "curves.png")


def flat_params(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Settings as MLflow parameters: nested mappings flattened with dots, values as text (at
    most 500 characters, MLflow's limit), unset values left out."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            out[name] = text[:500]
    return out


class Tracker:
    """One training run's MLflow run; every method is a no-op once the server has failed."""

    def __init__(self, uri: str, experiment: str, registered_model: str | None = None) -> None:
        self.uri, self.experiment = uri, experiment
        self.registered_model = registered_model or experiment
        self.run_id: str | None = None
        self.logged: set[int] = set()
        self.failed = False
        for name, value in (
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", TIMEOUT_S),
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", RETRIES),
        ):
            os.environ.setdefault(name, str(value))

    def _call(self, what: str, action: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return action()
        except Exception as exc:  # tracking is a record, never the reason a run fails
            self.failed = True
            log.warning(
                "MLflow at %s: %s failed (%s: %s); training goes on without tracking",
                shown(self.uri),
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:300] if str(exc) else "",
            )
            return None

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def start(self, run_name: str, settings: dict[str, Any], tags: dict[str, str]) -> None:
        """Open the MLflow run (the experiment made if new) and log the settings."""

        def start() -> None:
            client = self._client()
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id if found else client.create_experiment(self.experiment)
            )
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in flat_params(settings).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
                client.log_batch(self.run_id, params=params[i : i + 100])

        self._call("starting the run", start)

    def epochs(self, rows: Iterable[dict[str, float]]) -> None:
        """Log the metrics of the epochs not logged yet (step = epoch)."""
        new = [row for row in rows if int(row["epoch"]) not in self.logged]
        if not new or self.run_id is None:
            return

        def log_rows() -> None:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [
                Metric(key, float(value), now, int(row["epoch"]))
                for row in new
                for key, value in row.items()
                if key != "epoch" and isinstance(value, int | float)
            ]
            for i in range(0, len(metrics), 1000):
                self._client().log_batch(self.run_id, metrics=metrics[i : i + 1000])
            self.logged.update(int(row["epoch"]) for row in new)

        self._call("logging metrics", log_rows)

    def finish(self, out: str, fs: Any, summary: dict[str, Any]) -> str | None:
        """Log the run folder's files and its best model, register that model, close the run;
        returns the registered version (``name/version``) or None."""
        if self.run_id is None:
            return None

        def finish() -> str:
            client = self._client()
            with tempfile.TemporaryDirectory(prefix="segray-mlflow-") as tmp:
                for name in RUN_FILES:
                    uri = storage.join(out, name)
                    if fs.exists(uri):
                        path = os.path.join(tmp, name)
                        with open(path, "wb") as f:
                            f.write(fs.read_bytes(uri))
                        client.log_artifact(self.run_id, path)
                model = os.path.join(tmp, "model")
                os.makedirs(model)
                for name in ("model.keras", "model.json"):
                    with open(os.path.join(model, name), "wb") as f:
                        f.write(fs.read_bytes(storage.join(out, name)))
                client.log_artifacts(self.run_id, model, "model")
            for key, value in summary.items():
                client.set_tag(self.run_id, f"segray.{key}", str(value))
            source = f"{client.get_run(self.run_id).info.artifact_uri}/model"
            if not _registered(client, self.registered_model):
                client.create_registered_model(self.registered_model)
            version = client.create_model_version(self.registered_model, source, run_id=self.run_id)
            client.set_terminated(self.run_id, "FINISHED")
            return f"{self.registered_model}/{version.version}"

        return self._call("logging the model", finish)

    def fail(self) -> None:
        """Close the run as failed (the training raised)."""
        if self.run_id is not None:
            self._call(
                "closing the run", lambda: self._client().set_terminated(self.run_id, "FAILED")
            )


def shown(uri: str) -> str:
    """``uri`` without the user and password it may carry, for messages."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[1]}{slash}{path}"


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def reachable(uri: str, timeout: float = 3.0) -> str | None:
    """None when an HTTP tracking server answers its health check, else why not (a local
    ``file:`` or ``sqlite:`` store always answers)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            return None if answer.status == 200 else f"health check answered {answer.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def tracker_for(uri: str | None, experiment: str, registered_model: str | None) -> Tracker | None:
    """A tracker for ``uri``, or None when none is asked for or MLflow is not installed."""
    if not uri:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning(
            "--tracking-uri %s: MLflow is not installed (pip install 'segray[tracking]'); "
            "training goes on without tracking",
            shown(uri),
        )
        return None
    tracker = Tracker(uri, experiment, registered_model)
    why = reachable(uri)
    if why is not None:
        log.warning(
            "MLflow at %s does not answer (%s); training goes on without tracking", shown(uri), why
        )
        tracker.failed = True
    return tracker
