"""cluster.yaml against Ray's own schema and consistency checks."""

from __future__ import annotations

import copy
from pathlib import Path

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
