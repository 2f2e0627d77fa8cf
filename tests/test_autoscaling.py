"""Autoscaling on one machine: `retro build-db` against cluster.yaml's node types, started on demand by
Ray's autoscaler with its fake multi-node provider standing in for AWS.

The node types are read from cluster.yaml (``available_node_types``: each worker type's custom
resources, e.g. ``cpu_build`` offers ``build``), with 1 CPU each instead of the instance's (this machine
has 2 cores) and at most one node per type; the head has 0 CPUs, as there. A real head runs the real
autoscaler (``ray start --head --autoscaling-config``), everything on 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps the autoscaler's nodes on loopback, as
``ray.node_ip_address`` does for the command). The platform's own command, `retro build-db --config
debug` with ``ray.build_resource=build``, joins it: no worker exists when it starts, so the build can
only finish if the autoscaler starts a ``cpu_build`` node for its tasks; no other worker type may be
started (nothing of the build asks for them), and the node must be released once idle.

Seen here and not asserted: during the build the fake provider also starts (and idles out) nodes of
the head's type, 0 CPUs and no custom resource (9-15 per build, each recorded as offering nothing), most
likely for Ray Data's resource requests that ask only for memory; they can run nothing. On AWS the
whether the AWS autoscaler does the same was not checked (`ray status` shows it: idle CPU-less workers).
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from local_head import LocalHead, free_port
from ray.util.state import list_nodes
from sim_cluster import ROOT

from retro_platform.db.manifest import load_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def fake_node_types() -> dict:
    """cluster.yaml's node types for the fake provider: their custom resources, 1 CPU, at most 1 node."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {}
    for name, spec in raw["available_node_types"].items():
        custom = {k: v for k, v in spec.get("resources", {}).items() if k not in ("CPU", "GPU")}
        if name == raw["head_node_type"]:
            types[name] = {"resources": {"CPU": 0, **custom}, "node_config": {}, "max_workers": 0}
        else:
            types[name] = {
                "resources": {"CPU": 1, **custom},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            }
    return {"head": raw["head_node_type"], "types": types}


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head (0 CPUs) whose autoscaler starts cluster.yaml's node types through the fake provider."""
    gcs_port = free_port()
    shape = fake_node_types()
    config = {
        "cluster_name": "fake-retro",
        "max_workers": len(shape["types"]) - 1,
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
        "available_node_types": shape["types"],
        "head_node_type": shape["head"],
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
        num_cpus=0,
        gcs_port=gcs_port,
        extra_args=(f"--autoscaling-config={config_path}",),
        env={
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the autoscaler's nodes register at 127.0.0.1
        },
    )
    try:
        head.wait_for_dashboard()
        yield head
    finally:
        head.stop()


def worker_nodes(head: LocalHead) -> list:
    """Every worker node the cluster has seen (alive or dead), from the state API."""
    return [n for n in list_nodes(address=head.dashboard_url, detail=True) if not n.is_head_node]


def offers(node) -> tuple[str, ...]:
    """The custom resources a node offers (a dead node's are no longer reported: only alive ones)."""
    builtin = ("CPU", "GPU", "memory", "object_store_memory")
    return tuple(
        sorted(k for k in node.resources_total or {} if k not in builtin and not k.startswith("node:"))
    )


class NodeWatch:
    """Records, every second, the custom resources of every alive worker node (what type it is)."""

    def __init__(self, head: LocalHead):
        self.head = head
        self.seen: dict[str, tuple[str, ...]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the state API may time out under load: next round
                for node in worker_nodes(self.head):
                    if node.state == "ALIVE":
                        self.seen[node.node_id] = offers(node)
            self._stop.wait(1.0)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_build_db_scales_up_a_cpu_build_node_and_releases_it(autoscaling_head, tmp_path):
    work = tmp_path / "work"
    assert worker_nodes(autoscaling_head) == []  # every type starts at 0 nodes
    t0 = time.monotonic()
    with NodeWatch(autoscaling_head) as watch:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "retro_platform.cli",
                "build-db",
                "--config",
                "debug",
                *("--set", f"work_dir={work}"),
                *("--set", f"ray.address={autoscaling_head.address}"),
                *("--set", "ray.node_ip_address=127.0.0.1"),
                *("--set", "ray.build_resource=build"),
            ],
            capture_output=True,
            text=True,
            timeout=400,
            env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)},
        )
    build_s = time.monotonic() - t0
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    manifest = load_manifest(Path(work) / "db")
    assert manifest.status == "complete" and len(manifest.index.shards) == 2
    started = collections.Counter(watch.seen.values())
    print(f"\nbuild {build_s:.0f} s; worker nodes seen alive, by what they offer: {dict(started)}")
    assert started[("build",)] >= 1, f"no cpu_build node was started for the build: {dict(started)}"
    # no node of a type the build does not ask for (gpu_embed, gpu_train, cpu_pool)
    others = {o: n for o, n in started.items() if o and o != ("build",)}
    assert not others, f"nodes started that the build does not use: {others}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and any(n.state == "ALIVE" for n in worker_nodes(autoscaling_head)):
        time.sleep(2)
    assert not [n.node_id for n in worker_nodes(autoscaling_head) if n.state == "ALIVE"], "idle node kept"
