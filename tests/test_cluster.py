"""cluster.yaml against Ray's own schema and consistency checks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from retro_platform.config import CONFIGS_DIR, load_config

ROOT = Path(__file__).resolve().parent.parent


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_ray_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster()
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # Ray's JSON schema plus its own consistency checks
    types = config["available_node_types"]
    assert raw["provider"]["type"] == "aws"
    assert set(types) == {"head", "cpu_build", "gpu_embed", "gpu_train", "cpu_pool"}
    # the head takes no tasks or actors; every worker type autoscales from 0
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert all(t["min_workers"] == 0 for name, t in types.items() if name != raw["head_node_type"])
    assert types["cpu_build"]["resources"].get("build") and types["gpu_train"]["resources"].get("train")
    assert types["gpu_embed"]["resources"].get("embed") and types["cpu_pool"]["resources"].get("pool")
    # neighbour actors serve training for hours: not on spot
    assert "InstanceMarketOptions" not in types["cpu_pool"]["node_config"]
    assert any("[gpu]" in c for c in raw["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    # shared storage on every node, mounted only once (setup commands re-run on `ray up`)
    mount = [c for c in raw["setup_commands"] if "mount -t nfs4" in c]
    assert len(mount) == 1 and "mountpoint -q /mnt/shared ||" in mount[0] and "nfsvers=4.1" in mount[0]


def _gpus(node_type: dict) -> float:
    """GPUs a node type offers: declared, or implied by an AWS GPU instance family (g4dn, g5, p4d, ...)."""
    if "GPU" in node_type.get("resources", {}):
        return node_type["resources"]["GPU"]
    instance = node_type.get("node_config", {}).get("InstanceType", "")
    return 1 if re.match(r"^[gp]\d", instance) else 0


def _requests(config) -> list[tuple[str, str | None, bool]]:
    """(what, custom resource, needs a GPU) for every kind of task/actor the stages of a config start,
    as the platform asks for them (db/build/tasks.py, db/build/indexing.py, neighbors/pool.py, commands/train.py)."""
    from retro_platform.commands.evaluate import evaluation_task_options
    from retro_platform.db.build.indexing import index_resources
    from retro_platform.db.build.tasks import build_resources, embed_resources

    def name(resources: dict[str, float] | None) -> str | None:
        return next(iter(resources)) if resources else None

    ray_cfg = config.ray
    return [
        ("build tasks", name(build_resources(config)), False),
        ("encoder actors", name(embed_resources(config)), config.database.embed.gpus_per_actor > 0),
        ("index tasks", name(index_resources(config)), config.database.index.use_gpu),
        ("training workers", ray_cfg.train_resource, config.train.use_gpu),
        (
            "the evaluation task",
            name(evaluation_task_options(config).get("resources")),
            evaluation_task_options(config)["num_gpus"] > 0,
        ),
        (
            "neighbour actors",
            ray_cfg.pool_resource or ray_cfg.build_resource,
            config.pool.gpus_per_actor > 0,
        ),
    ]


def _missing(preset: str, requests: list[tuple[str, str | None, bool]]) -> list[str]:
    """The requests of a preset that no worker type of cluster.yaml can satisfy."""
    raw = _cluster()
    workers = {n: t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]}
    missing = []
    for what, resource, gpu in requests:
        if resource is None and not gpu:
            continue  # plain CPU work: any worker type can host it
        hosts = [
            name
            for name, t in workers.items()
            if (resource is None or t["resources"].get(resource, 0) > 0) and (not gpu or _gpus(t) > 0)
        ]
        if not hosts:
            needs = " and ".join(filter(None, [resource and f"resource {resource!r}", gpu and "a GPU"]))
            missing.append(f"{preset}: {what} ask for {needs}, which no node type of cluster.yaml offers")
    return missing


PRESETS = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_stage_of_a_preset_has_a_node_type_of_cluster_yaml(preset):
    """A request no worker type can satisfy never starts a node: the stage would hang (as GPU encoder
    actors asking for `build`, offered only by CPU nodes, once did)."""
    assert _missing(preset, _requests(load_config(preset))) == []


def test_gpu_preset_work_dir_is_on_the_shared_mount():
    assert load_config("gpu-125m").work_dir.startswith("/mnt/shared/")


def test_every_node_type_has_an_instance_profile_and_nothing_lives_only_on_the_head():
    """Credentials come from each node's instance profile (never keys in an environment), the EFS id is
    the one placeholder, and MLflow keeps its store on EFS and its artifacts in the cluster's bucket."""
    raw = _cluster()
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile", {}).get("Name"), name
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\s*[=:]", text)
    placeholders = {
        line.strip() for line in text.splitlines() if "fs-CHANGE" in line and not line.strip().startswith("#")
    }
    assert placeholders == {"EFS_ID=fs-CHANGE"}
    (server,) = [c for c in raw["head_setup_commands"] if "mlflow server" in c]
    assert "--backend-store-uri sqlite:////mnt/shared/" in server
    assert "--artifacts-destination s3://" in server
