"""The database build on a simulated cluster shaped like cluster.yaml (tests/sim_cluster.py): every stage
runs on the ``cpu_build`` node, and the driver only plans.

The head has ``num_cpus=0`` (as in cluster.yaml), one ``cpu_build`` node offers ``build`` and one
``gpu_train`` node offers ``train``; all on 127.0.0.1. The debug preset's build joins through
``ray.address`` / ``ray.node_ip_address`` with ``ray.build_resource=build``. Afterwards Ray's state API
(served by the head's dashboard, on loopback) says where every task and actor ran, and the test checks
**per stage** (reading the corpus, the tokenizer, chunking, embedding, indexing) that the stage left
tasks or actors and that all of them ran on the build node, asking for the ``build`` resource: a stage
that moved into the driver leaves no task and fails here. While the build runs, a thread samples the
driver's resident memory: its peak may exceed what it held before by at most ``DRIVER_GROWTH_MB``.
Measured on the debug preset: +87 MB (Ray's client, Ray Data's executor, planning, the manifest);
the encoder loaded in the driver (the embedding stage moved there) adds ~390 MB (torch and the model).
The bound catches that; a moved chunking or indexing stage of this tiny corpus is caught by its
missing tasks instead.
"""

from __future__ import annotations

import collections
import threading
import time

import psutil
import pytest
import ray
from conftest import debug_config
from ray.util.state import list_actors, list_tasks
from sim_cluster import sim_cluster

from retro_platform.commands.build_db import build_database
from retro_platform.db.manifest import load_manifest, validate_database

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

MB = 1024**2
DRIVER_GROWTH_MB = 200

# Ray Data's bookkeeping actors: detached, num_cpus=0 and pinned to the driver's node on purpose
# (a node-affinity strategy to the node of the process that ran the Dataset; on a real cluster, the
# head where `ray job submit` runs drivers). They run no build code and ask for no CPU.
RAY_DATA_BOOKKEEPING = {
    "_StatsActor",
    "_AutoscalingCoordinatorActor",
    "ActorLocationTracker",
    "_UsageCollectionActor",
}
TERMINAL_TASK_STATES = {"FINISHED", "FAILED"}

STAGES = {
    "corpus": lambda name: name.startswith("build.corpus."),
    "tokenizer": lambda name: name == "build.tokenizer",
    "chunking": lambda name: name.startswith("build.chunks."),
    "embedding": lambda name: "embedder" in name.lower(),  # Ray Data's MapWorker(MapBatches(ShardEmbedder))
    "indexing": lambda name: name.startswith("build.index."),
}
"""Stage -> which task / actor class names belong to it (db/build/tasks.py names tasks build.<stage>)."""


class PeakRss:
    """Samples this process's resident memory every 50 ms while in the ``with`` block."""

    def __init__(self):
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        """Peak minus the RSS before the block, in MB."""
        return (self.peak - self.before) / MB


def settled_state(address: str, timeout_s: float = 30.0):
    """Tasks and actors of the cluster once the build's last events have reached the GCS."""
    deadline = time.monotonic() + timeout_s
    previous = -1
    while True:
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


def test_every_build_stage_runs_on_the_build_node_and_the_driver_stays_small(tmp_path):
    with sim_cluster({"cpu_build": 1, "gpu_train": 1}, dashboard=True) as sim:
        config = debug_config(tmp_path / "work", *sim.overrides(), "ray.build_resource=build")
        t0 = time.monotonic()
        with PeakRss() as rss:
            manifest = build_database(config)
        build_s = time.monotonic() - t0
        assert not ray.is_initialized()  # the build joined the cluster and left it
        on_disk = load_manifest(config.db_path)
        assert on_disk.status == "complete" and on_disk.db_id == manifest.db_id
        validate_database(config.db_path)
        tasks, actors = settled_state(sim.dashboard_url)
        roles = sim.roles

    actor_of = {a.actor_id: a for a in actors}
    where: dict[str, list[tuple[str, str, dict]]] = collections.defaultdict(
        list
    )  # stage -> (what, role, asks)
    for task in tasks:
        actor = actor_of.get(task.actor_id)
        if actor is not None and actor.class_name in RAY_DATA_BOOKKEEPING:
            continue
        name = task.name if actor is None else f"{actor.class_name}.{task.name}"
        node = task.node_id or (actor.node_id if actor else None)  # creation tasks: their actor's node
        asks = (actor.required_resources if actor is not None else task.required_resources) or {}
        for stage, member in STAGES.items():
            if member(name):
                where[stage].append((f"task {name}", roles.get(node, f"unknown {node}"), asks))
    for actor in actors:
        for stage, member in STAGES.items():
            if member(actor.class_name):
                where[stage].append(
                    (
                        f"actor {actor.class_name}",
                        roles.get(actor.node_id, "?"),
                        actor.required_resources or {},
                    )
                )
    print(f"\nbuild {build_s:.1f}s, driver RSS +{rss.growth_mb:.0f} MB (peak {rss.peak / MB:.0f} MB)")
    for stage in STAGES:
        print(f"  {stage}: {collections.Counter((what, role) for what, role, _ in where[stage])}")

    for stage in STAGES:
        assert where[stage], f"stage {stage} left no task or actor in the cluster: it ran in the driver"
        off = sorted({f"{what} on {role}" for what, role, _ in where[stage] if role != "cpu_build"})
        assert not off, f"stage {stage} ran outside the cpu_build node: {off}"
        unrouted = sorted({what for what, _, asks in where[stage] if "build" not in asks})
        assert not unrouted, f"stage {stage}: not asking for the `build` resource: {unrouted}"
    # Ray Data's bookkeeping actors may sit on the head, but never ask for a CPU or GPU
    for actor in actors:
        if actor.class_name in RAY_DATA_BOOKKEEPING:
            asks = {k for k, v in (actor.required_resources or {}).items() if v and k in ("CPU", "GPU")}
            assert not asks, f"Ray Data's {actor.class_name} asks for {actor.required_resources}"
    alive = [a.class_name for a in actors if a.state != "DEAD" and a.class_name not in RAY_DATA_BOOKKEEPING]
    assert not alive, f"actors of the build still alive after it returned: {alive}"
    assert rss.growth_mb < DRIVER_GROWTH_MB, (
        f"the driver grew by {rss.growth_mb:.0f} MB while building (bound {DRIVER_GROWTH_MB} MB): "
        "a stage's data or model is being held in the driver"
    )
