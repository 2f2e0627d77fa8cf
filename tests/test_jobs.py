"""`ray job submit` of the whole pipeline to a real head started with `ray start --head` (loopback)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_job_succeeds_and_leaves_mlflow_runs(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    work = tmp_path / "work"
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.pipeline --config configs/debug.yaml --set work_dir={work}",
        runtime_env={
            "working_dir": str(REPO),
            "env_vars": {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
        },
    )
    deadline = time.monotonic() + 600
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-4000:]
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "completion:", "[6/6]", "next words right"):
        assert stage in logs

    # The job joined the head (RAY_ADDRESS) instead of starting its own Ray.
    assert "starting a local Ray" not in logs
    # Outputs went to the requested work dir, not into the uploaded working directory.
    assert (work / "db" / "manifest.json").is_file()
    uploaded = [p for p in Path(ray_head.temp_dir).rglob("working_dir_files/*") if p.is_dir()]
    assert uploaded, "the job ran from an uploaded copy of the repository"
    for copy in uploaded:
        assert not (copy / "work").exists() and not (copy / ".venv").exists()
        assert not list(copy.rglob("mlflow.db")) and not list(copy.rglob("*.safetensors"))

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["retro-debug"], output_format="list")
    by_kind = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("model_kind"), []).append(run)
    assert set(by_kind) >= {"retro", "baseline"}
    for kind in ("retro", "baseline"):
        (run,) = by_kind[kind]
        assert run.info.status == "FINISHED"
        assert int(run.data.params["train.steps"]) == 30
        assert run.data.metrics["eval_valid_bpb_no_retrieval"] > 0
    assert by_kind["retro"][0].data.metrics["eval_valid_bpb_retrieval"] > 0
    comparison = {run.data.tags["comparison"] for kind in ("retro", "baseline") for run in by_kind[kind]}
    assert len(comparison) == 1
