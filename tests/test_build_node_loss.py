"""A build worker node lost in the middle of each stage of `retro build-db` on a simulated cluster
(tests/sim_cluster.py): the head (0 CPUs) and one ``cpu_build`` node; when the stage's first output file
appears in the database folder, that node is removed without warning (every process killed) and a fresh
``cpu_build`` node joins. The build must finish by itself, or on one rerun, with every file
byte-identical to a clean build of the same preset (conftest's ``debug_db``, built once per session on
the local Ray: the database's files do not depend on where its tasks ran).

Today's main passes these (Ray retries the lost tasks and restarts Ray Data's encoder actors on the
fresh node; a rerun skips the files already recorded): the tests keep it true, and each checks that the
stage was really under way when the node went (fewer of its files than a complete build has).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import debug_config
from sim_cluster import sim_cluster

from retro_platform.commands.build_db import build_database
from retro_platform.db.manifest import load_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STAGES = {"chunking": "chunks", "embedding": "embeddings", "indexing": "index"}
"""Build stage -> the database folder its outputs go to."""


def data_files(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file of a database but its manifest (which records when it ran)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def reference(debug_db):
    """The files and manifest file list of the clean debug build, shared by every case."""
    config, manifest = debug_db
    return data_files(Path(config.db_path)), manifest.files


@pytest.mark.parametrize("stage", list(STAGES))
def test_build_node_lost_mid_stage_finishes_identical_to_a_clean_build(stage, reference, tmp_path):
    files, manifest_files = reference
    folder = STAGES[stage]
    expected_in_stage = sum(1 for name in files if name.startswith(f"{folder}/"))
    with sim_cluster({"cpu_build": 1}) as sim:
        config = debug_config(tmp_path / "work", *sim.overrides(), "ray.build_resource=build")
        stage_dir = Path(config.db_path) / folder
        errors: list[BaseException] = []

        def build():
            try:
                build_database(config)
            except Exception as exc:  # a failed first run is allowed one rerun (below)
                errors.append(exc)

        thread = threading.Thread(target=build)
        t0 = time.monotonic()
        thread.start()
        at_removal = None
        deadline = time.monotonic() + 180
        while thread.is_alive() and time.monotonic() < deadline:
            present = [p for p in stage_dir.rglob("*") if p.is_file()] if stage_dir.exists() else []
            if present:
                at_removal = len(present)
                sim.remove(sim.nodes["cpu_build"][0])
                sim.add("cpu_build")
                break
            time.sleep(0.02)
        removed_s = time.monotonic() - t0
        thread.join(timeout=240)
        assert not thread.is_alive(), "the build did not finish within 4 minutes of the node loss"
        assert at_removal is not None, f"the build ended before its {stage} stage wrote a file"
        reran = bool(errors)
        if errors:
            build_database(config)  # the one rerun: redoes only what was lost
        print(
            f"\n{stage}: node removed at {removed_s:.1f} s with {at_removal}/{expected_in_stage} files of "
            f"the stage; {'finished on one rerun: ' + repr(errors[0])[:200] if reran else 'finished by itself'}"
            f" ({time.monotonic() - t0:.0f} s)"
        )
    assert at_removal < expected_in_stage, f"the {stage} stage was already complete when the node went"
    manifest = load_manifest(config.db_path)
    assert manifest.status == "complete" and manifest.files == manifest_files
    built = data_files(Path(config.db_path))
    assert sorted(built) == sorted(files)
    different = [name for name in files if built[name] != files[name]]
    assert not different, f"files that differ from a clean build: {different}"
