"""A build worker node lost in the middle of each stage of `retro build-db` on a simulated cluster
(tests/sim_cluster.py): the head (0 CPUs) and one ``cpu_build`` node; when a stage's first output file
appears in the database folder, that node is removed without warning (every process killed) and a fresh
``cpu_build`` node joins, in turn for chunking, embedding and indexing of one build. The build must
finish by itself, or with one rerun per lost node, with every file byte-identical to a clean build of
the same preset (conftest's ``debug_db``, built once per session on
the local Ray: the database's files do not depend on where its tasks ran).

Today's main passes this (Ray retries the lost tasks and restarts Ray Data's encoder actors on the
fresh node; a rerun skips the files already recorded): the test keeps it true, and checks that each
stage was really under way when its node went (fewer of its files than a complete build has).
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
    """The files and manifest file list of the clean debug build: what the build must end with."""
    config, manifest = debug_db
    return data_files(Path(config.db_path)), manifest.files


def test_build_nodes_lost_mid_each_stage_finish_identical_to_a_clean_build(reference, tmp_path):
    """One build loses its build node mid-chunking, then (on the fresh node) mid-embedding, then
    mid-indexing; it finishes with at most one rerun per lost node."""
    files, manifest_files = reference
    expected = {
        stage: sum(1 for n in files if n.startswith(f"{folder}/")) for stage, folder in STAGES.items()
    }
    removals: dict[str, tuple[int, float]] = {}  # stage -> (its files present, seconds into the build)
    runs: list[BaseException | None] = []  # each build run's outcome: None when it completed
    with sim_cluster({"cpu_build": 1}) as sim:
        config = debug_config(tmp_path / "work", *sim.overrides(), "ray.build_resource=build")

        def build():
            try:
                build_database(config)
                runs.append(None)
            except Exception as exc:  # a run that failed after a lost node is allowed a rerun (below)
                runs.append(exc)

        def start() -> threading.Thread:
            thread = threading.Thread(target=build)
            thread.start()
            return thread

        t0 = time.monotonic()
        thread = start()
        for stage, folder in STAGES.items():
            stage_dir = Path(config.db_path) / folder
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                present = [p for p in stage_dir.rglob("*") if p.is_file()] if stage_dir.exists() else []
                if present:
                    removals[stage] = (len(present), time.monotonic() - t0)
                    sim.remove(sim.nodes["cpu_build"][0])
                    sim.add("cpu_build")
                    break
                if not thread.is_alive():
                    if runs[-1] is None:
                        break  # the build completed before this stage wrote a file (fails below)
                    thread = start()
                time.sleep(0.02)
        thread.join(timeout=240)
        assert not thread.is_alive(), "the build did not finish within 4 minutes of the last node loss"
        if runs[-1] is not None:
            build_database(config)  # the rerun after the last loss: redoes only what was lost
            runs.append(None)
        failures = [repr(r)[:200] for r in runs if r is not None]
        print(
            "\n"
            + "; ".join(
                f"{stage}: node removed at {at:.1f} s with {n}/{expected[stage]} files"
                for stage, (n, at) in removals.items()
            )
            + f"; {len(runs)} run(s), failures {failures} ({time.monotonic() - t0:.0f} s)"
        )
    for stage in STAGES:
        assert stage in removals, f"the build ended before its {stage} stage wrote a file"
        assert removals[stage][0] < expected[stage], f"the {stage} stage was complete when the node went"
    assert len(runs) <= 1 + len(removals), failures  # at most one rerun per lost node
    manifest = load_manifest(config.db_path)
    assert manifest.status == "complete" and manifest.files == manifest_files
    built = data_files(Path(config.db_path))
    assert sorted(built) == sorted(files)
    different = [name for name in files if built[name] != files[name]]
    assert not different, f"files that differ from a clean build: {different}"
