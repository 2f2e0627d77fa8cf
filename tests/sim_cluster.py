"""A simulated multi-node Ray cluster on this machine, shaped like cluster.yaml, bound to 127.0.0.1.

``ray.cluster_utils.Cluster`` starts one raylet per node: a head with ``num_cpus=0`` (no task or actor
may land there, as on the real head) and worker nodes of cluster.yaml's node types, each offering the
custom resources its type declares there (``cpu_build`` -> ``build``, ``gpu_train`` -> ``train``,
``cpu_pool`` -> ``pool``, ...) with 1 CPU and a small object store. Every node registers at 127.0.0.1,
and the platform's commands join with ``ray.address=<head>`` and ``ray.node_ip_address=127.0.0.1``
(``SimCluster.overrides``): nothing listens on the machine's network address.

Nodes can be removed without warning (``remove``: every process of the node is killed, as when an
instance disappears) and fresh ones added while a command runs. The head's GCS declares a node dead
after ~3 missed health checks of 0.5 s (Ray's default is 5 x 3 s), so fault tests do not wait 15 s
for Ray to notice.

The cluster lives in a private temp dir (``RAY_TMPDIR``), so its ``ray_current_cluster`` file and
session folders never touch another Ray of this machine; its processes are found by that variable at
the end and any still running then fails the test (after being killed by pid). The session's local Ray
(conftest's ``ray_session``), if an earlier test started it, is stopped while the cluster runs and
started again afterwards, because a driver is connected to one cluster at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import conftest
import psutil
import pytest
import ray
import yaml
from local_head import free_port
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2
LOOPBACK = "127.0.0.1"

HEALTH_CHECK = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
"""The head's GCS settings: a removed node is declared dead within ~2 s."""


def node_types() -> dict[str, dict[str, float]]:
    """{worker node type: its custom resources} from cluster.yaml (the head left out)."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return {
        name: {k: v for k, v in spec.get("resources", {}).items() if k not in ("CPU", "GPU")}
        for name, spec in raw["available_node_types"].items()
        if name != raw["head_node_type"]
    }


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    """Processes (other than this one) started with ``RAY_TMPDIR=temp_dir``: the cluster's and their children."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAY_TMPDIR") == temp_dir:
                found.append(proc)
    return found


def _stop_leftovers(temp_dir: str, grace_s: float = 20.0) -> list[str]:
    """Wait for the cluster's processes to exit; kill (by pid) and describe those still running after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while (left := _processes_of(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    return described


class SimCluster:
    """A running simulated cluster: its head, its worker nodes by type, and what to pass to a command."""

    def __init__(self, cluster: Cluster, head, cpus_per_node: float, object_store_mb: int):
        self.cluster = cluster
        self.head = head
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.types = node_types()
        self.roles: dict[str, str] = {head.node_id: "head"}
        """{node id: node type} of every node ever started (removed ones included)."""
        self.nodes: dict[str, list] = {}
        """{node type: its live nodes}."""
        self.dashboard_url: str | None = None
        """The head's dashboard (state API, job API) when started with ``dashboard=True``: pass it as
        ``address`` to ``ray.util.state`` (a GCS address on loopback would be rewritten to the
        machine's network address)."""

    @property
    def address(self) -> str:
        """The head's GCS address (127.0.0.1:port)."""
        return self.cluster.address

    def overrides(self) -> list[str]:
        """``--set`` style settings that make a platform command join this cluster on loopback."""
        return [f"ray.address={self.address}", f"ray.node_ip_address={LOOPBACK}"]

    def add(self, node_type: str, cpus: float | None = None):
        """Start a node of ``node_type`` (cluster.yaml's resources, ``cpus`` CPUs) -> the Ray node."""
        node = self.cluster.add_node(
            num_cpus=self.cpus_per_node if cpus is None else cpus,
            resources=dict(self.types[node_type]),
            object_store_memory=self.object_store_mb * MB,
            node_ip_address=LOOPBACK,
        )
        self.roles[node.node_id] = node_type
        self.nodes.setdefault(node_type, []).append(node)
        return node

    def remove(self, node) -> None:
        """Kill every process of ``node`` at once (no graceful shutdown), as when an instance is lost."""
        self.cluster.remove_node(node, allow_graceful=False)
        for nodes in self.nodes.values():
            if node in nodes:
                nodes.remove(node)

    def node_of(self, node_id: str):
        """The live node with id ``node_id``."""
        return next(n for nodes in self.nodes.values() for n in nodes if n.node_id == node_id)

    def wait_dead(self, node_id: str, timeout_s: float = 30.0) -> float:
        """Block until the GCS reports ``node_id`` dead (needs a connected driver) -> seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"node {node_id} still alive {timeout_s} s after its removal")


@contextlib.contextmanager
def sim_cluster(
    workers: dict[str, int],
    cpus_per_node: float = 1,
    object_store_mb: int = 150,
    dashboard: bool = False,
) -> Iterator[SimCluster]:
    """A simulated cluster: a head with 0 CPUs and ``workers[type]`` nodes of each cluster.yaml type.

    With ``dashboard`` the head serves the state API (``ray.util.state``) on loopback. On exit every node
    is stopped, and a test that left processes of the cluster running fails."""
    session_ray = ray.is_initialized()
    ray.shutdown()  # a driver joins one cluster: leave the session's local Ray (restarted below)
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    leftovers: list[str] = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", temp_dir)
            mp.delenv("RAY_ADDRESS", raising=False)
            cluster = Cluster(shutdown_at_exit=True)
            try:
                head_args: dict = {"include_dashboard": False}
                dashboard_port = free_port()
                if dashboard:
                    head_args = {
                        "include_dashboard": True,
                        "dashboard_host": LOOPBACK,
                        "dashboard_port": dashboard_port,
                    }
                head = cluster.add_node(
                    num_cpus=0,
                    object_store_memory=80 * MB,
                    node_ip_address=LOOPBACK,
                    _system_config=HEALTH_CHECK,
                    **head_args,
                )
                sim = SimCluster(cluster, head, cpus_per_node, object_store_mb)
                if dashboard:
                    sim.dashboard_url = f"http://{LOOPBACK}:{dashboard_port}"
                for node_type, count in workers.items():
                    for _ in range(count):
                        sim.add(node_type)
                cluster.wait_for_nodes()
                yield sim
            finally:
                try:
                    ray.shutdown()
                    cluster.shutdown()
                finally:
                    leftovers = _stop_leftovers(temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if session_ray:
            next(conftest.ray_session.__wrapped__())  # the session's local Ray, as conftest starts it
        shutil.rmtree(temp_dir, ignore_errors=True)  # a session folder Ray's shutdown re-created late
    assert not leftovers, f"processes of the test cluster still running after its shutdown: {leftovers}"


def connect(sim: SimCluster, namespace: str = "retro") -> None:
    """Join ``sim`` from this process on loopback, as the platform's commands do (``ray_utils.init_ray``)."""
    from retro_platform.config import load_config
    from retro_platform.ray_utils import init_ray

    init_ray(load_config("debug", [*sim.overrides(), f"ray.namespace={namespace}"]))
