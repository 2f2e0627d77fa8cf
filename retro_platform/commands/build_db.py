"""`retro build-db`: build, resume or repair the retrieval database on Ray (the stages:
``retro_platform.db.build``), tracked in MLflow."""

from __future__ import annotations

import dataclasses
import logging

from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.db.build import Build
from retro_platform.db.manifest import Manifest
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)


def build_database(config: PlatformConfig) -> Manifest:
    """Build, resume or repair the database at ``config.db_path`` -> its manifest. Tracked in MLflow.

    Logs the config as params, counts and per-stage throughput as metrics, and manifest.json as an
    artifact of an MLflow run tagged ``stage=build-db``.
    """
    with ray_session(config):
        build = Build(config)
        with tracking.start_run(config, stage="build-db") as run:
            tracking.log_params(config.flatten())
            manifest = build.run()
            metrics = dict(build.stats)
            metrics.update(tracking.flatten_numbers(dataclasses.asdict(manifest.counts)))
            metrics["files_written"] = len(build.written)
            tracking.log_metrics(metrics)
            tracking.set_tags({"db_id": manifest.db_id, "index": manifest.index.factory})
            tracking.log_artifact(build.layout.manifest)
            logger.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
        return manifest
