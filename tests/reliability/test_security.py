"""Security defaults: loopback servers with token auth, no code run from files, outputs never uploaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from retro_platform.checkpoints import load_training_state
from retro_platform.config import load_config
from retro_platform.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]

LOCAL_RAY_PROBE = textwrap.dedent(
    """
    import json, os, sys, urllib.error, urllib.request
    import psutil, ray
    from retro_platform.config import load_config
    from retro_platform.ray_utils import init_ray

    init_ray(load_config("debug", [f"work_dir={sys.argv[1]}"]))
    url = ray._private.worker.get_dashboard_url()
    port = int(url.rsplit(":", 1)[1])
    binds = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                    if c.status == "LISTEN" and c.laddr.port == port})
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5)
        anonymous = 200
    except urllib.error.HTTPError as exc:
        anonymous = exc.code
    print("PROBE " + json.dumps({"url": url, "binds": binds, "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                                 "anonymous_status": anonymous}))
    ray.shutdown()
    """
)


def test_local_ray_dashboard_listens_on_loopback_only_and_requires_a_token(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LOCAL_RAY_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stderr[-3000:]
    probe = json.loads(lines[0][len("PROBE ") :])
    assert probe["url"].startswith("127.0.0.1:")
    assert probe["binds"] == ["127.0.0.1"]  # the dashboard / job API: loopback only
    # Ray's own gRPC ports bind every interface (Ray has no setting for it); Ray 2.60's token auth,
    # which a local init_ray leaves on, is what guards them and the HTTP API.
    assert probe["auth_mode"] == "token"
    assert probe["anonymous_status"] == 401


def test_the_cluster_keeps_dashboard_on_loopback_and_mlflow_off_the_public_interface():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow_server = " ".join(c for c in cluster["head_setup_commands"] if "mlflow server" in c)
    assert "--host" in mlflow_server and "0.0.0.0" not in mlflow_server
    assert load_config("debug").ray.dashboard_host == "127.0.0.1"


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 3, "data_position": 0, "optimizer": Payload()}, tmp_path / "train_state.pt")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(CheckpointError, match="train_state.pt holds something other than tensors"):
        load_training_state(tmp_path, optimizer, scheduler)
    assert not marker.exists()


def test_no_code_path_unpickles_files():
    """Checkpoints load with safetensors or torch.load(weights_only=True); arrays never allow pickle."""
    offenders = []
    for path in [
        *REPO.glob("retro_platform/**/*.py"),
        *REPO.glob("retro_model/**/*.py"),
        *REPO.glob("jobs/*.py"),
    ]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"pickle\.loads?\(|allow_pickle\s*=\s*True|cloudpickle|joblib\.load", code):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("preset", ["debug", "demo", "wiki-full"])
def test_job_uploads_never_carry_outputs_of_the_default_work_dirs(preset):
    """`ray job submit --working-dir .` skips what .gitignore lists: check every output a run writes."""
    config = load_config(preset)
    work = Path(config.work_dir)
    if not work.is_relative_to(REPO):
        pytest.skip(f"{preset} writes outside the repository ({work})")
    outputs = [
        config.tracking_uri.removeprefix("sqlite:///"),
        config.db_path / "manifest.json",
        config.db_path / "index" / "shard-0000.faiss",
        config.db_path / "chunks" / "train" / "shard-0000.parquet",
        Path(config.storage_path) / config.train.name / "checkpoint_0" / "model.safetensors",
        work / "mlartifacts" / "1" / "x" / "artifacts" / "checkpoint" / "model.safetensors",
        REPO / "mlruns" / "0" / "meta.yaml",
    ]
    relative = [str(Path(p).relative_to(REPO)) for p in outputs]
    checked = subprocess.run(
        ["git", "check-ignore", "--no-index", *relative], cwd=REPO, capture_output=True, text=True
    )
    assert sorted(checked.stdout.split()) == sorted(relative)
