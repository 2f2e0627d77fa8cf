"""Autoscaling on one machine: Ray's fake multi-node provider stands in for the cloud of cluster.yaml.

The head runs the real autoscaler (``ray start --head --autoscaling-config``) with node types shaped
like cluster.yaml's (``cpu_build`` offers the ``build`` resource, ``gpu_train`` offers ``train``,
``cpu_pool`` offers ``pool``, all from 0 nodes). A driver asks for a ``build`` task, a ``train`` task
and a ``pool`` actor, as the platform's stages do (``ray.build_resource`` / ``ray.train_resource`` /
``ray.pool_resource`` in config): the autoscaler must start one node of the matching type for each, and
terminate them all once they have been idle past ``idle_timeout_minutes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from local_head import LocalHead, free_port

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], log_to_driver=False)

    @ray.remote(num_cpus=0.5, resources={"build": 1})
    def build_stage():
        return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0.5, resources={"train": 1})
    def train_stage():
        return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0.5, resources={"pool": 0.01})
    class ShardStandIn:  # a neighbour shard actor
        def node(self):
            return ray.get_runtime_context().get_node_id()

    KINDS = ("build", "train", "pool")

    def alive_workers():
        return {
            n["NodeID"]: sorted(k for k in n["Resources"] if k in KINDS)
            for n in ray.nodes()
            if n["Alive"] and (set(KINDS) & set(n["Resources"]))
        }

    t0 = time.monotonic()
    # the nodes seen right after each stage (a stage's node may idle out while the next one starts)
    build_node = ray.get(build_stage.remote(), timeout=120)
    scaled_up = alive_workers()
    train_node = ray.get(train_stage.remote(), timeout=120)
    scaled_up.update(alive_workers())
    shard = ShardStandIn.remote()
    pool_node = ray.get(shard.node.remote(), timeout=120)
    scaled_up.update(alive_workers())
    ray.kill(shard)  # the pool is shut down: its node becomes idle
    up_s = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while alive_workers() and time.monotonic() < deadline:
        time.sleep(1)
    print("RESULT " + json.dumps({
        "build_node": build_node, "train_node": train_node, "pool_node": pool_node,
        "scaled_up": scaled_up,
        "left_after_idle": alive_workers(), "up_s": up_s, "down_s": time.monotonic() - t0 - up_s,
    }))
    """
)


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head with 1 CPU (no build/train/pool resources) and the autoscaler on the fake provider."""
    gcs_port = free_port()
    node_types = {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "cpu_build": {
            "resources": {"CPU": 1, "build": 16},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
        "gpu_train": {
            "resources": {"CPU": 1, "train": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
        "cpu_pool": {
            "resources": {"CPU": 1, "pool": 16},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
    }
    config = {
        "cluster_name": "fake-retro",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
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
    config_path = tmp_path / "fake-cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = LocalHead(
        num_cpus=1,
        gcs_port=gcs_port,
        extra_args=(f"--autoscaling-config={config_path}",),
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    try:
        head.wait_for_dashboard()
        yield head
    finally:
        head.stop()


def test_build_train_and_serve_stages_scale_their_node_types_up_and_down(autoscaling_head):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, autoscaling_head.address],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"driver failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(lines[0][len("RESULT ") :])
    print(f"scale-up {report['up_s']:.0f}s, scale-down {report['down_s']:.0f}s")
    # each stage ran on a node the autoscaler started for it, of the type offering its resource
    assert report["scaled_up"].get(report["build_node"]) == ["build"]
    assert report["scaled_up"].get(report["train_node"]) == ["train"]
    assert report["scaled_up"].get(report["pool_node"]) == ["pool"]
    assert len({report["build_node"], report["train_node"], report["pool_node"]}) == 3
    # and all were released once idle
    assert report["left_after_idle"] == {}, report
