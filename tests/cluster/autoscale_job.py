"""Driver run by tests/test_cluster.py against a fake multi-node head: stages ask for `build` and `train`.

Prints one JSON line: the node types that came up for each stage and how long it took.
"""

import json
import sys
import time

import ray

ray.init(address=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=1, resources={"build": 1})
def build_stage() -> str:
    """Stands in for a database-build task: runs only where the `build` resource is."""
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1, resources={"train": 1})
def train_stage() -> str:
    """Stands in for a training worker: runs only where the `train` resource is."""
    return ray.get_runtime_context().get_node_id()


t0 = time.time()
build_node, train_node = ray.get([build_stage.remote(), train_stage.remote()], timeout=150)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(
    json.dumps(
        {
            "build_node_has_build": nodes[build_node].get("build", 0) > 0,
            "train_node_has_train": nodes[train_node].get("train", 0) > 0,
            "distinct_nodes": build_node != train_node,
            "alive_nodes": len(nodes),
            "seconds": round(time.time() - t0, 1),
        }
    )
)
