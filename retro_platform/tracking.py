"""MLflow tracking: one run per stage (build-db, train, eval), on the configured store.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the
work directory (``sqlite:////abs/work/mlflow.db``, artifacts beside it). Runs are tagged with their
stage and ``tracking.comparison`` so RETRO and baseline runs of one comparison can be grouped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from retro_platform.config import PlatformConfig

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500
"""Longer parameter values are truncated (MLflow stores params as short strings)."""


def setup(config: PlatformConfig) -> str:
    """Point MLflow at the configured store and experiment (created with a local artifact root) -> id."""
    uri = config.tracking_uri
    mlflow.set_tracking_uri(uri)
    name = config.tracking.experiment
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(config.work_dir) / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def start_run(config: PlatformConfig, stage: str, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (and end) a run for ``stage``, tagged with stage, comparison and model kind."""
    setup(config)
    name = run_name or config.tracking.run_name or f"{stage}-{config.train.name}"
    tags = {"stage": stage}
    if config.tracking.comparison:
        tags["comparison"] = config.tracking.comparison
    with mlflow.start_run(run_name=name, tags=tags) as run:
        yield run


def log_params(params: dict[str, Any]) -> None:
    """Log parameters in one batch (values stringified and truncated)."""
    clean = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}
    mlflow.log_params(clean)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics in one batch (non-numbers are dropped)."""
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Set run tags."""
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder as artifacts of the active run."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def flatten_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> {'a.b': number} keeping only numbers."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
