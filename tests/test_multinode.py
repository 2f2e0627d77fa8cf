"""The database build on several Ray nodes: nothing runs on the head, the build stays on `build` nodes.

``ray.cluster_utils.Cluster`` starts three raylets on this machine, shaped like cluster.yaml: a head with
``num_cpus=0`` (where no work may land), a worker offering the custom resource ``build`` and one offering
``train``, each with a bounded object store. The debug preset's build joins that cluster through
``ray.address`` with ``ray.build_resource=build``; afterwards Ray's state API (served by the head's
dashboard, on loopback) says where every task and actor ran.

The cluster lives in a private temp dir (``RAY_TMPDIR``), so its ``ray_current_cluster`` file and session
folders never touch another Ray of this machine, and its processes are found by that variable at the end:
any still running then fails the test (after being stopped by their pid). The session's local Ray
(conftest's ``ray_session``), if an earlier test started it, is stopped for this test and started again
afterwards with conftest's own settings, because a driver can be connected to one cluster only.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import tempfile
import time

import conftest
import psutil
import pytest
import ray
from conftest import debug_config
from local_head import free_port
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from retro_platform.commands.build_db import build_database
from retro_platform.db.manifest import load_manifest, validate_database

pytestmark = pytest.mark.slow

MB = 1024**2

# Ray Data's bookkeeping actors: detached, num_cpus=0 and pinned to the driver's node on purpose
# (NodeAffinitySchedulingStrategy / a node-id label selector to the node of the process that ran the
# Dataset; on a real cluster, the head where `ray job submit` runs drivers). They hold statistics,
# autoscaling requests, actor locations and usage counters, run no build code and stay alive until the
# cluster stops. They are the only thing allowed on the head, and only while they ask for no CPU or GPU.
RAY_DATA_BOOKKEEPING = {
    "_StatsActor",  # ray.data._internal.stats (named datasets_stats_actor)
    "_AutoscalingCoordinatorActor",  # ray.data._internal.cluster_autoscaler
    "ActorLocationTracker",  # ray.data._internal.execution.node_trackers
    "_UsageCollectionActor",  # ray.data._internal.usage
}

ENCODER_MARKERS = ("embed", "encod")  # ShardEmbedder / ChunkStoreEmbedder inside Ray Data's MapWorker
TERMINAL_TASK_STATES = {"FINISHED", "FAILED"}


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


def _restart_session_ray() -> None:
    """Start the session's local Ray again exactly as conftest's ``ray_session`` does (its teardown at the end
    of the session then stops this one)."""
    next(conftest.ray_session.__wrapped__())


@contextlib.contextmanager
def _deadline(seconds: int):
    """Raise TimeoutError in this (main) thread after ``seconds``: a wedged build fails instead of hanging."""

    def expired(signum, frame):
        raise TimeoutError(f"the multi-node build did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def three_nodes():
    """(cluster, {node_id: role}): a head without CPUs, a `build` worker and a `train` worker."""
    session_ray = ray.is_initialized()
    ray.shutdown()  # a driver joins one cluster: leave the session's local Ray (restarted below)
    temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    leftovers: list[str] = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", temp_dir)
            cluster = Cluster(shutdown_at_exit=True)
            try:
                head = cluster.add_node(
                    num_cpus=0,
                    object_store_memory=100 * MB,
                    include_dashboard=True,  # the state API (list_tasks / list_actors) is served by it
                    dashboard_host="127.0.0.1",
                    dashboard_port=free_port(),
                )
                build = cluster.add_node(num_cpus=1, resources={"build": 8}, object_store_memory=150 * MB)
                train = cluster.add_node(num_cpus=1, resources={"train": 1}, object_store_memory=150 * MB)
                cluster.wait_for_nodes()
                yield cluster, {head.node_id: "head", build.node_id: "build", train.node_id: "train"}
            finally:
                try:
                    ray.shutdown()
                    cluster.shutdown()
                finally:
                    leftovers = _stop_leftovers(temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if session_ray:
            _restart_session_ray()
    assert not leftovers, f"processes of the test cluster still running after its shutdown: {leftovers}"


def _settled_state(address: str, timeout_s: float = 30.0):
    """Tasks and actors of the cluster once the finished build's last events have reached the GCS: every
    task in a final state, every actor of the build dead, and the same number of tasks twice in a row."""
    deadline = time.monotonic() + timeout_s
    previous = -1
    while True:
        # the driver's own entry (this process, on the head) is left out by the state API's default
        tasks = list_tasks(address=address, detail=True, limit=10_000)
        actors = list_actors(address=address, detail=True, limit=10_000)
        settled = (
            len(tasks) == previous
            and all(t.state in TERMINAL_TASK_STATES for t in tasks)
            and all(a.state == "DEAD" for a in actors if a.class_name not in RAY_DATA_BOOKKEEPING)
        )
        if settled or time.monotonic() > deadline:
            return tasks, actors
        previous = len(tasks)
        time.sleep(1.0)


def _label(task) -> str:
    return f"{task.type} {task.name}"


def _role(roles: dict[str, str], node_id: str | None) -> str:
    return roles.get(node_id, f"unknown node {node_id}") if node_id else "no node"


def test_build_runs_on_build_nodes_and_never_on_the_head(three_nodes, tmp_path):
    cluster, roles = three_nodes
    config = debug_config(tmp_path / "work", f"ray.address={cluster.address}", "ray.build_resource=build")
    t0 = time.monotonic()
    with _deadline(300):
        manifest = build_database(config)
        build_s = time.monotonic() - t0
        assert not ray.is_initialized()  # the build joined the cluster and left it

        on_disk = load_manifest(config.db_path)
        assert on_disk.status == "complete" and on_disk.db_id == manifest.db_id
        assert on_disk.counts.chunks["train"] > 0 and len(on_disk.index.shards) == 2
        validate_database(config.db_path)

        tasks, actors = _settled_state(cluster.address)

    # Ray Data's bookkeeping actors (and the calls Ray Data makes on them) are the only exception.
    bookkeeping = [a for a in actors if a.class_name in RAY_DATA_BOOKKEEPING]
    for actor in bookkeeping:
        asks = {k for k, v in (actor.required_resources or {}).items() if v and k in ("CPU", "GPU")}
        assert not asks, f"Ray Data's {actor.class_name} asks for {actor.required_resources}"
    skipped = {a.actor_id for a in bookkeeping}
    actor_node = {a.actor_id: a.node_id for a in actors}
    build_actors = [a for a in actors if a.actor_id not in skipped]
    build_tasks = [t for t in tasks if t.actor_id not in skipped]
    # the state API gives an actor's creation task no node: it ran where its actor lives
    task_node = {t.task_id: t.node_id or actor_node.get(t.actor_id) for t in build_tasks}

    placement = collections.Counter((_role(roles, task_node[t.task_id]), _label(t)) for t in build_tasks)
    placement.update((_role(roles, a.node_id), f"ACTOR {a.class_name}") for a in build_actors)
    placement.update((_role(roles, a.node_id), f"bookkeeping ACTOR {a.class_name}") for a in bookkeeping)
    print(f"\nbuild {build_s:.1f}s; placement (node, what): count")
    for (role, what), n in sorted(placement.items()):
        print(f"  {role:6} {what}: {n}")

    # the build ran work of its own: tasks that ask for the build resource, and the encoder actors
    normal = [t for t in build_tasks if t.type == "NORMAL_TASK"]
    assert normal, f"no task of the build was recorded: {sorted(placement)}"
    encoders = [a for a in build_actors if any(m in a.class_name.lower() for m in ENCODER_MARKERS)]
    assert encoders, f"no encoder actor among {[a.class_name for a in build_actors]}"

    unplaced = [_label(t) for t in build_tasks if not task_node[t.task_id]]
    unplaced += [f"ACTOR {a.class_name}" for a in build_actors if not a.node_id]
    assert not unplaced, f"the state API gives no node for: {unplaced}"
    head = [what for (role, what) in placement if role == "head" and not what.startswith("bookkeeping")]
    assert not head, f"work of the build ran on the head (num_cpus=0): {head}"
    elsewhere = [
        f"{role}: {what}"
        for (role, what) in placement
        if role != "build" and not what.startswith("bookkeeping")
    ]
    assert not elsewhere, f"work of the build ran outside the `build` node: {elsewhere}"
    # on the build node because they asked for it (ray.build_resource), not because it had a free CPU
    unrouted = [
        _label(t)
        for t in build_tasks
        if t.type != "ACTOR_TASK" and "build" not in (t.required_resources or {})
    ]
    unrouted += [f"ACTOR {a.class_name}" for a in build_actors if "build" not in (a.required_resources or {})]
    assert not unrouted, f"tasks or actors of the build that do not ask for the `build` resource: {unrouted}"
    alive = [a.class_name for a in build_actors if a.state != "DEAD"]
    assert not alive, f"actors of the build still alive after it returned: {alive}"
