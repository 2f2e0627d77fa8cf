"""`retro build-db`: corpus -> documents -> tokenizer -> chunk store -> embeddings -> index shards -> manifest.

The build is a streaming pipeline on Ray: every stage's data is read and written by Ray Data tasks,
Ray tasks and encoder actors on the build's nodes, and the driver only plans, records checksums and
writes the manifest. One module per stage (``documents``, ``chunks``, ``embeddings``, ``indexing``),
the bookkeeping in ``ledger``, the order of the stages in ``pipeline``.

Idempotent and resumable: every output file is written to a temporary name and renamed, and the
manifest records, for each file, its sha256 and the sha256 of the files it was made from. The manifest
is rewritten (``status: building``) as files are written (at most every 5 s), so a re-run after an interruption or a
deleted/corrupt file skips each output that is still current and rebuilds only the rest,
byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import dataclasses
import logging

from retro_platform.config import PlatformConfig
from retro_platform.db.build.pipeline import Build
from retro_platform.db.manifest import Manifest
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)

__all__ = ["build_database"]


def build_database(config: PlatformConfig) -> Manifest:
    """Build, resume or repair the database at ``config.db_path`` -> its manifest. Tracked in MLflow.

    Logs the config as params, counts and per-stage throughput as metrics, and manifest.json as an
    artifact of an MLflow run tagged ``stage=build-db``.
    """
    from retro_platform import tracking  # here: build workers import this package, and MLflow is heavy

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
