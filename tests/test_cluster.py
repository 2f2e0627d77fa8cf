"""cluster.yaml against Ray's own schema, and autoscaling proven with Ray's fake multi-node provider."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_is_valid_for_the_ray_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # Ray's JSON schema plus its own consistency checks
    types = config["available_node_types"]
    assert raw["provider"]["type"] == "aws"
    assert types["cpu_build"]["min_workers"] == 0 and types["gpu_train"]["min_workers"] == 0
    assert types["cpu_build"]["resources"].get("build") and types["gpu_train"]["resources"].get("train")
    assert any("[gpu]" in c for c in raw["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_autoscaler_starts_the_node_type_each_stage_asks_for(tmp_path):
    """A private head with the fake multi-node provider: the build stage brings up a `cpu_build` node,
    the train stage a `gpu_train` node. (Scale-down is not observable with this provider on one host:
    every fake node reports the host's IP, so the v1 autoscaler's load metrics cannot tell them apart.)"""
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    config = {
        "cluster_name": "retro-fake",
        "max_workers": 4,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_build": {
                "resources": {"CPU": 1, "build": 4},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
            "gpu_train": {
                "resources": {"CPU": 1, "train": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    config_path = tmp_path / "autoscaler.json"
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--autoscaling-config={config_path}",
            f"--temp-dir={tmp_path / 'ray'}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(8)
        job = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "cluster" / "autoscale_job.py"), f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert job.returncode == 0, job.stderr[-2000:]
        result = json.loads(job.stdout.strip().splitlines()[-1])
        assert result["build_node_has_build"] and result["train_node_has_train"] and result["distinct_nodes"]
        assert result["alive_nodes"] >= 3  # head + one node of each type, started by the autoscaler
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # the fake nodes run in the head's process group: nothing of this cluster may survive
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "ray")], check=False)
