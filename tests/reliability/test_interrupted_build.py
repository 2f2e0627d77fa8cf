"""`retro build-db` killed mid-chunking, mid-embedding and mid-index resumes to a byte-identical database.

The build runs as a CLI process with its own local Ray; the moment a given output file appears, the
driver and every process it started get SIGKILL (no cleanup code runs). The folder is then a partial
build (refused by every reader). One build is killed at each stage in turn (each rerun resumes the
previous one's partial folder), and the last run completes it: same database id and the same checksum
for every file as the uninterrupted build of the session fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import debug_config

from retro_platform.commands.build_db import build_database
from retro_platform.db.manifest import load_manifest, validate_database
from retro_platform.errors import DatabaseError

RETRO = str(Path(sys.executable).with_name("retro"))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process, its process group and every descendant (its local Ray included)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        victims = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(victims, timeout=20)
    process.wait(timeout=20)


# each kill point in build order, with the file whose appearance triggers the kill
KILL_POINTS = [
    ("chunking", "chunks/train/shard-0000.parquet"),
    ("embedding", "embeddings/train/shard-0000.npy"),
    ("index", "index/shard-0000.faiss"),
]


def build_until(work: Path, trigger: Path, log_path: Path) -> None:
    """Run `retro build-db` (its own local Ray) and SIGKILL it the moment ``trigger`` exists."""
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [RETRO, "build-db", "--config", "debug", "--set", f"work_dir={work}"]
            + ["--set", "ray.include_dashboard=false"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
        deadline = time.monotonic() + 240
        try:
            while not trigger.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            kill_tree(process)


def test_build_killed_mid_each_stage_resumes_byte_identical(debug_db, tmp_path):
    """One build killed three times: mid-chunking, then (resumed) mid-embedding, then (resumed again)
    mid-index; each time the folder is a partial build, and the last resume ends byte-identical."""
    _, uninterrupted = debug_db
    work = tmp_path / "work"
    config = debug_config(work)
    log = tmp_path / "build.log"
    files_before = 0
    for stage, trigger in KILL_POINTS:
        build_until(work, config.db_path / trigger, log)
        assert (config.db_path / trigger).exists(), (
            f"the build never reached {stage}:\n{log.read_text()[-3000:]}"
        )
        partial = load_manifest(config.db_path)
        assert partial.status == "building", stage
        assert files_before <= len(partial.files) < len(uninterrupted.files), stage
        files_before = len(partial.files)
        with pytest.raises(DatabaseError, match="only partly built"):
            validate_database(config.db_path)

    resumed = build_database(config)
    assert resumed.files == uninterrupted.files
    assert resumed.db_id == uninterrupted.db_id
    assert not list(config.db_path.rglob("*.tmp"))
    validate_database(config.db_path)
