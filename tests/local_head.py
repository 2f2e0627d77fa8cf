"""A real Ray head started with ``ray start --head`` for tests that need one (job submission, autoscaling).

Everything listens on 127.0.0.1 on ports picked free at start, the temp dir is private (and short: Ray's
socket paths must fit in 107 bytes) and only the processes this head started are stopped at the end
(never ``ray stop``, which kills every Ray process of the machine, including the test session's own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalHead:
    """``ray start --head --block`` in its own process group, with the dashboard on loopback."""

    def __init__(
        self,
        num_cpus: int = 2,
        extra_args: tuple[str, ...] = (),
        env: dict | None = None,
        gcs_port: int | None = None,
        without_env: tuple[str, ...] = (),
    ):
        """``env``: variables added to this process's environment for the head's processes;
        ``without_env``: variables of this process's environment the head's processes do not get."""
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        args = [
            RAY_BIN,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={768 * 1024**2}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
            *extra_args,
        ]
        full_env = dict(os.environ)
        for name in ("RAY_ADDRESS", *without_env):
            full_env.pop(name, None)
        # The job's `python` is this interpreter (the project's venv).
        full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
        # Ray 2.60 protects a head's APIs with a token (generated in ~/.ray/auth_token when missing);
        # clients in this process send it only when the mode is set explicitly.
        os.environ["RAY_AUTH_MODE"] = "token"
        full_env["RAY_AUTH_MODE"] = "token"
        # Ray read the mode when it was imported (conftest imports ray.data first): make it read it again
        from ray._private.authentication_test_utils import reset_auth_token_state

        reset_auth_token_state()
        full_env.update(env or {})
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_for_dashboard(self, timeout: float = 90.0) -> None:
        """Block until the job-submission API answers (or raise with the head's log).

        Ray 2.60 protects the API with a token (``~/.ray/auth_token``); the SDK client sends it.
        """
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(Exception):
                JobSubmissionClient(self.dashboard_url).list_jobs()
                return
            time.sleep(1)
        raise RuntimeError(f"Ray head did not come up; its log:\n{self.log_path.read_text()[-4000:]}")

    def processes(self) -> list[psutil.Process]:
        """Every live process this head started (its tree and anything using its temp dir)."""
        found = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
        return list(found.values())

    def stop(self) -> None:
        """Terminate everything this head started, then remove its temp dir."""
        victims = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        # what has not exited 3 s after SIGTERM is killed (its temp dir and ports are this head's only)
        _, alive = psutil.wait_procs(victims, timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
