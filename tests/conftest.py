"""Session fixtures: a real moto S3 server process on 127.0.0.1 and a real local Ray instance."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from segray.devtools.ports import free_port
from segray.devtools.s3server import TEST_CREDENTIALS, MotoServer
from segray.io import storage


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process, with test credentials in the environment for its lifetime."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TEST_CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        with MotoServer() as server:
            yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    """The URL of the moto server (``http://127.0.0.1:PORT``)."""
    return s3_server.endpoint


@pytest.fixture
def s3_prefix(s3_endpoint) -> str:
    """A fresh ``s3://bucket/prefix`` on the moto server for one test."""
    uri = f"s3://segray-test/{uuid.uuid4().hex[:12]}"
    storage.make_bucket(uri, endpoint=s3_endpoint)
    return uri


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance whose workers see the S3 server's credentials (forwarded by segray)."""
    from segray.runtime import init_ray

    ray = init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory):
    """``mlflow server`` (SQLite backend, local artifact root) on a free loopback port, stopped
    after the session."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    from segray.train import tracking

    while tracking.reachable(url, timeout=1) is not None:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)
    log.close()
