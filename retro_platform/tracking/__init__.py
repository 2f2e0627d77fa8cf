"""MLflow tracking: one run per stage (build-db, train, eval), on the configured store.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the
work directory (``sqlite:////abs/work/mlflow.db``, artifacts beside it). Runs are tagged with their
stage and ``tracking.comparison`` so RETRO and baseline runs of one comparison can be grouped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import Manifest
from retro_platform.errors import TrackingError

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500
"""Longer parameter values are truncated (MLflow stores params as short strings)."""


_REACHABLE: set[str] = set()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when the tracking store cannot be used (instead of MLflow's minutes
    of retries): an HTTP server must answer ``/health``; a SQLite file's folder must exist or be creatable.
    """
    if uri in _REACHABLE:
        return
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read(64)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"the MLflow tracking server {uri} cannot be reached ({reason}); start it, or fix "
                "tracking.uri / MLFLOW_TRACKING_URI (unset both to use the local SQLite store)"
            ) from None
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        folder = Path(path).parent if path and path != ":memory:" else None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(
                    f"the MLflow store {uri} cannot be created ({exc.strerror} at {folder}); fix "
                    "tracking.uri / MLFLOW_TRACKING_URI or work_dir"
                ) from None
    _REACHABLE.add(uri)


def setup(config: PlatformConfig) -> str:
    """Point MLflow at the configured store and experiment (created with a local artifact root) -> id."""
    uri = config.tracking_uri
    check_reachable(uri)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would then override the store of
    # every later config in this process (and of Ray workers started after it): put the user's back.
    user_value = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_value is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_value
    name = config.tracking.experiment
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):  # artifacts next to the work: a local folder, or S3 (boto3)
            work = config.work_dir
            location = storage.join(work, "mlartifacts") if storage.is_remote(work) else None
            location = location or (Path(work) / "mlartifacts").resolve().as_uri()
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
    """Log a file or a folder (local) or a file on object storage as artifacts of the active run."""
    if storage.is_remote(str(path)):
        path = storage.local_copy(str(path))  # MLflow uploads local files
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


# ---- training runs -----------------------------------------------------------------------------------
# RETRO and baseline runs of one comparison share ``tracking.experiment`` and the tag ``comparison``;
# ``model_kind`` (retro | baseline) tells them apart.

MODEL_ARTIFACT = "model"
"""Artifact path (and name) of the logged pyfunc model."""

CHECKPOINT_ARTIFACT = "checkpoint"
"""Artifact path of the final training checkpoint (+ tokenizer.json)."""

_PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc.py"


def run_exists(config: PlatformConfig, run_id: str | None) -> bool:
    """True when ``run_id`` is a run of the configured tracking store."""
    if not run_id:
        return False
    check_reachable(config.tracking_uri)
    try:
        MlflowClient(config.tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def training_tags(config: PlatformConfig, manifest: Manifest) -> dict[str, str]:
    """Tags of a training run: model kind, comparison group, database id, neighbour source, run name."""
    tags = {
        "model_kind": "retro" if config.model.retrieval else "baseline",
        "db_id": manifest.db_id,
        "neighbor_mode": config.train.neighbor_mode if config.model.retrieval else "none",
        "train_name": config.train.name,
    }
    if config.tracking.comparison:
        tags["comparison"] = config.tracking.comparison
    return {k: str(v) for k, v in tags.items()}


@contextlib.contextmanager
def training_run(
    config: PlatformConfig, manifest: Manifest, resume_run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start the MLflow run of a training (driver side; workers log to it by id) and end it after.

    A new run gets the flattened config as params, the database manifest id, and the comparison tags. A
    resumed training (``resume_run_id``, e.g. from the checkpoint it resumes) continues its old run, so
    its curves continue too; params it already has are kept and changed ones are reported in a tag.
    """
    params = {**config.flatten(), "db_id": manifest.db_id}
    if run_exists(config, resume_run_id):
        setup(config)
        with mlflow.start_run(run_id=resume_run_id) as run:
            old = run.data.params
            clean = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}
            changed = sorted(k for k, v in clean.items() if k in old and old[k] != v)
            if changed:
                logger.warning("resumed run %s with changed settings: %s", resume_run_id, changed)
                mlflow.set_tag("resumed_with_changes", ",".join(changed)[:MAX_PARAM_LENGTH])
            log_params({k: v for k, v in clean.items() if k not in old})
            set_tags(training_tags(config, manifest))
            yield run
        return
    name = config.tracking.run_name or config.train.name
    with start_run(config, stage="train", run_name=name) as run:
        log_params(params)
        set_tags(training_tags(config, manifest))
        yield run


class MetricBuffer:
    """Rank-0 metrics of a run, sent in batches (one ``log_batch`` call instead of ~10 ms per metric)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._pending: list[Metric] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Queue numeric metrics of ``step``."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._pending.append(Metric(key, float(value), now, step))

    def flush(self) -> None:
        """Send queued metrics (MLflow takes at most 1000 per batch)."""
        while self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending[:1000])
            self._pending = self._pending[1000:]


def log_checkpoint(checkpoint_dir: str | Path, tokenizer: str | Path) -> None:
    """The final checkpoint (model, optimizer, schedule, step, config) and the tokenizer, as artifacts."""
    log_artifact(checkpoint_dir, CHECKPOINT_ARTIFACT)
    log_artifact(tokenizer, CHECKPOINT_ARTIFACT)


def log_retro_model(checkpoint_dir: str | Path, tokenizer: str | Path) -> str:
    """Log the model of a checkpoint as an MLflow pyfunc model -> its model URI.

    The model is logged from code (``retro_platform/tracking/pyfunc.py``), not pickled: its artifact
    holds ``model.safetensors`` (weights + RetroConfig) and ``tokenizer.json``, and loading runs no code
    from the store beyond that file. ``load_retro_model`` gets the ``Retro`` back.
    """
    import importlib.metadata

    from retro_model.checkpoint import WEIGHTS_FILE

    requirements = []
    for package in ("retro-platform", "torch", "safetensors", "tokenizers"):
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(package)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(Path(checkpoint_dir) / WEIGHTS_FILE, Path(tmp) / WEIGHTS_FILE)
        shutil.copy2(storage.local_copy(str(tokenizer)), Path(tmp) / "tokenizer.json")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(_PYFUNC_CODE),
            artifacts={"model": tmp},
            pip_requirements=requirements,
        )
    return info.model_uri


def registered_model_name(config: PlatformConfig) -> str:
    """The registry name of a run's final model (``tracking.registered_model``, else the experiment's
    name, with ``-baseline`` for a model without retrieval)."""
    if config.tracking.registered_model:
        return config.tracking.registered_model
    return config.tracking.experiment + ("" if config.model.retrieval else "-baseline")


def register_model(config: PlatformConfig, model_uri: str, manifest: Manifest, extra: dict[str, Any]) -> str:
    """Register a logged model in the MLflow model registry, tagged with the database it was trained on
    (``db_id``, ``db_revision``, ``tokenizer_sha256``) and its run -> ``models:/<name>/<version>``."""
    name = registered_model_name(config)
    tags = {
        "db_id": manifest.db_id,
        "db_revision": manifest.revision or 0,
        "db_path": config.db_path,
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "train_name": config.train.name,
        "step": extra.get("step"),
        "retrieval": config.model.retrieval,
    }
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return f"models:/{name}/{version.version}"


def load_retro_model(model_uri: str):
    """A model logged by ``log_retro_model`` (e.g. ``runs:/<run_id>/model``) -> Retro in eval mode."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def log_metrics_to_run(config: PlatformConfig, run_id: str, metrics: dict[str, float]) -> None:
    """Log final metrics (e.g. ``eval_*``) into an existing run, in one batch."""
    buffer = MetricBuffer(config.tracking_uri, run_id)
    buffer.add(metrics, step=0)
    buffer.flush()
