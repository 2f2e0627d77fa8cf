"""Shared fixtures: one local Ray for the session and a small real database built once.

Ray starts with explicit CPUs, a bounded object store and no dashboard, on its own temp folder, and
only this Ray is shut down at the end (never `ray stop`, which would kill other Ray processes).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


def debug_config(work_dir, *overrides: str):
    """The debug preset with everything under ``work_dir`` (plus ``--set`` style overrides)."""
    from retro_platform.config import load_config

    return load_config("debug", [f"work_dir={work_dir}", *overrides])


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=1024**3,
        include_dashboard=False,
        namespace="retro-tests",
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def debug_db(ray_session, tmp_path_factory):
    """(config, manifest) of the debug database: 300 real Wikipedia summaries, 2 shards, Flat."""
    from retro_platform.db.build import build_database

    work = tmp_path_factory.mktemp("debug-work")
    config = debug_config(work)
    manifest = build_database(config)
    return config, manifest
