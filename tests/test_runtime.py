"""Joining Ray: no credential travels in the runtime environment Ray shows and logs, and workers
still reach S3 with the credentials of their node."""

from __future__ import annotations

import json
import os

from segray.io import storage
from segray.runtime import SECRET_ENV


def test_no_secret_in_the_runtime_environment_and_workers_still_reach_s3(
    ray_local, s3_prefix, s3_endpoint
):
    ray = ray_local
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    assert secrets, "the S3 fixture sets credentials in the environment"
    storage.write_bytes(f"{s3_prefix}/probe.txt", b"seen", endpoint=s3_endpoint)

    @ray.remote
    def probe(uri: str, endpoint: str) -> tuple[dict, bytes]:
        # what Ray records for this task's job, and a read that needs credentials
        return ray.get_runtime_context().runtime_env, storage.read_bytes(uri, endpoint=endpoint)

    task_env, data = ray.get(probe.remote(f"{s3_prefix}/probe.txt", s3_endpoint))
    job_env = ray.get_runtime_context().runtime_env
    for recorded in (task_env, job_env):
        text = json.dumps(recorded)
        assert not any(secret in text for secret in secrets), text
        assert not any(key in text for key in SECRET_ENV), text
    assert '"AWS_DEFAULT_REGION"' in json.dumps(job_env)  # non-secret settings do travel
    assert data == b"seen"
