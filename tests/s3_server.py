"""A real S3-compatible server for tests: moto's standalone ``moto_server`` on 127.0.0.1.

It runs as a subprocess in its own session on a port picked free at start, answers the S3 API over
HTTP (any access key is accepted unless ``INITIAL_NO_AUTH_ACTION_COUNT=0`` is passed in ``env``, which
turns on moto's IAM checks so unknown keys are refused), keeps everything in memory, and is stopped
(its process group only, by id) by :meth:`S3Server.stop`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from local_head import free_port

MOTO_SERVER_BIN = str(Path(sys.executable).with_name("moto_server"))
ACCESS_KEY = "retro-test-key"
SECRET_KEY = "retro-test-secret"
REGION = "us-east-1"
ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)
"""The variables ``S3Server.env`` sets."""


class S3Server:
    """``moto_server -H 127.0.0.1 -p <free port>`` with its log in a temp file."""

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="moto-")) / "moto_server.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [MOTO_SERVER_BIN, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        try:
            self._wait_until_up(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not answer within {timeout}s: {self.log()}"
                    ) from None
                time.sleep(0.1)

    def log(self) -> str:
        """The server's output so far (for failure messages)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def env(self) -> dict[str, str]:
        """The variables that point an AWS client (pyarrow, boto3, MLflow) at this server."""
        values = (ACCESS_KEY, SECRET_KEY, REGION, REGION, self.endpoint, self.endpoint, self.endpoint)
        return dict(zip(ENV_NAMES, values, strict=True))

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"retro-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
