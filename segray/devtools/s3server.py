"""A local S3 endpoint for demos and tests: moto's standalone server as a child process.

It listens on 127.0.0.1 only, on a free port, and is reached over HTTP by boto3 and pyarrow exactly
as a real S3 endpoint would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

from segray.devtools.ports import free_port
from segray.errors import SegrayError

#: Credentials moto accepts; set only when the environment has none.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "segray-test",
    "AWS_SECRET_ACCESS_KEY": "segray-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """``with MotoServer() as server: server.endpoint`` — a moto S3 server process on 127.0.0.1."""

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        """Start the server and wait until it answers HTTP."""
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which(
            "moto_server"
        )
        if exe is None:
            raise SegrayError("moto_server not found: install the test extra (moto[server])")
        self._proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SegrayError(f"moto_server exited with code {self._proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise SegrayError(f"moto_server did not answer on {self.endpoint}")

    def stop(self) -> None:
        """Stop the server process."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
