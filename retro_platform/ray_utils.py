"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Protocol, TypeVar

import ray

from retro_platform.config import PlatformConfig
from retro_platform.output import QUIET_ENV_VARS, VERBOSE_ENV, filter_ray_worker_lines


class Stoppable(Protocol):
    """Something a session stops when it ends."""

    def shutdown(self) -> None:
        """Release what it holds (actors, threads)."""


T = TypeVar("T", bound=Stoppable)

logger = logging.getLogger(__name__)

# Ray Train v2 pays ~1.75 s per ray.train.report() with the default health-check interval; 0.2 s makes
# it ~90 ms (measured on 2 cores, see README). Workers inherit it through the runtime env.
DEFAULT_ENV_VARS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def runtime_env_vars() -> dict[str, str]:
    """Environment variables every Ray worker of the platform needs (caller's values win), with the
    driver's choice of output (``retro -v`` or quiet, see ``retro_platform.output``)."""
    from retro_platform import storage

    env = dict(DEFAULT_ENV_VARS)
    for name in (*DEFAULT_ENV_VARS, "MLFLOW_TRACKING_URI", "RETRO_CACHE_DIR", VERBOSE_ENV, *QUIET_ENV_VARS):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(storage.aws_env_vars())  # object storage (s3://) credentials and endpoint for every worker
    return env


def init_ray(config: PlatformConfig) -> bool:
    """Connect to the configured cluster, or start a bounded local one.

    A cluster address comes from ``ray.address`` in config or ``RAY_ADDRESS`` (set by ``ray job
    submit``); without one, a local Ray starts with explicit CPUs, a bounded object store and the
    dashboard (if enabled) on loopback. Returns True when this call connected this process to Ray (the
    caller then calls ``ray.shutdown()``), False when Ray was already initialised here.
    """
    for name, value in DEFAULT_ENV_VARS.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return False
    ray_config = config.ray
    env = {"env_vars": runtime_env_vars()}
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        # Under `ray job submit` the job's own runtime env (working_dir, env_vars) is merged with ours
        # instead of being refused as a conflict; ours carries the job's values (read from os.environ).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, namespace=ray_config.namespace, runtime_env=env, log_to_driver=True)
        filter_ray_worker_lines()
        return True
    num_cpus = ray_config.num_cpus or os.cpu_count() or 1
    logger.info(
        "starting a local Ray: %d CPUs, %.1f GB object store, dashboard %s",
        num_cpus,
        ray_config.object_store_memory_gb,
        f"on {ray_config.dashboard_host}" if ray_config.include_dashboard else "off",
    )
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=ray_config.num_gpus,
        object_store_memory=int(ray_config.object_store_memory_gb * 1024**3),
        include_dashboard=ray_config.include_dashboard,
        dashboard_host=ray_config.dashboard_host,
        namespace=ray_config.namespace,
        runtime_env=env,
        log_to_driver=True,
    )
    filter_ray_worker_lines()
    return True


class RaySession:
    """What a command holds while Ray is up: its config and what it started that must stop with it
    (e.g. the neighbour pools: anything with a ``shutdown()``)."""

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.owned: list[Stoppable] = []

    def own(self, resource: T) -> T:
        """``resource`` (e.g. ``NeighborPool.start(...)``) is shut down when the session ends -> it."""
        self.owned.append(resource)
        return resource


@contextlib.contextmanager
def ray_session(config: PlatformConfig) -> Iterator[RaySession]:
    """Ray for one command: joined or started by ``init_ray``; on exit (also on error) what the session
    owns (``RaySession.own``) is shut down, last first, then Ray itself when this session started it."""
    started = init_ray(config)
    session = RaySession(config)
    try:
        yield session
    finally:
        for resource in reversed(session.owned):
            resource.shutdown()
        if started:
            ray.shutdown()
