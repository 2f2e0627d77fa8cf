"""Running one stage's work as Ray tasks on the build's nodes, with progress lines and results in order.

Retries: Ray re-runs a task whose worker or node died (``max_retries``); a task that raised an
``OSError`` (a storage hiccup: a reset connection, a throttled or briefly unreachable S3 endpoint, an
NFS timeout) is re-run too, up to ``TASK_RETRIES`` times after a short pause, so one transient failure
does not fail the stage. Every task's output is written atomically and is a function of its inputs, so
a re-run task writes the same bytes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from retro_platform.config import PlatformConfig

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0
"""A stage logs how far it got at most this often (and when it ends)."""


TASK_RETRIES = 3
"""Times a build task is re-run after its worker died or it raised an OSError."""

RETRY_PAUSE_SECONDS = 1.0
"""Pause before a task that raised a transient OSError fails its attempt (Ray re-runs it at once)."""

PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""OSErrors that another attempt will not fix: retried without the pause (Ray cannot exclude them)."""

RETRY_OPTIONS: dict[str, Any] = {"max_retries": TASK_RETRIES, "retry_exceptions": [OSError]}
"""Ray options of every build task."""


def retrying(function: Callable[..., Any], in_place: bool = False) -> Callable[..., Any]:
    """``function`` for a build task: a transient OSError is logged and raised after a pause, so the
    attempt Ray makes next comes after the hiccup rather than into it. With ``in_place`` (a Ray Data
    map, whose tasks Ray Data does not retry on application errors) the call itself is repeated, up to
    ``TASK_RETRIES`` more times, a permanent OSError not."""

    @functools.wraps(function)
    def attempt(*args: Any, **kwargs: Any) -> Any:
        for tries in range(TASK_RETRIES + 1):
            try:
                return function(*args, **kwargs)
            except OSError as exc:
                permanent = isinstance(exc, PERMANENT_OS_ERRORS)
                if not permanent:
                    logger.warning("%s failed (%s: %s); retried", function.__name__, type(exc).__name__, exc)
                    time.sleep(RETRY_PAUSE_SECONDS)
                if not in_place or permanent or tries == TASK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    return attempt


def build_resources(config: PlatformConfig) -> dict[str, float] | None:
    """The custom resource every build task and actor asks for (routes the build to ``cpu_build`` nodes)."""
    return {config.ray.build_resource: 0.01} if config.ray.build_resource else None


def embed_resources(config: PlatformConfig) -> dict[str, float] | None:
    """What the encoder actors ask for besides CPUs/GPUs: ``ray.embed_resource`` (GPU encoder nodes) when
    set, else the build's resource."""
    name = config.ray.embed_resource or config.ray.build_resource
    return {name: 0.01} if name else None


def run_tasks(
    stage: str,
    function: Callable[..., Any],
    calls: list[dict[str, Any]],
    resources: dict[str, float] | None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``function(**call)`` for every call as a Ray task -> the results in call order.

    ``on_result(i, result)`` runs in the driver as each task finishes (the ledger records its output
    there, so an interruption keeps what finished). A task that raised an OSError or lost its worker is
    re-run up to ``TASK_RETRIES`` times; a task's exception that remains is raised here (the first to
    finish failing), after the other tasks were cancelled.
    """
    if not calls:
        return []
    remote = ray.remote(retrying(function)).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
        resources=resources,
        name=f"build.{stage}",
        **RETRY_OPTIONS,
    )
    pending = {remote.remote(**call): i for i, call in enumerate(calls)}
    results: list[Any] = [None] * len(calls)
    done = 0
    last = time.monotonic()
    try:
        while pending:
            # each wait takes a twentieth of what is left (at least one), so a stage of n tasks makes
            # O(log n) passes over the pending list instead of one per task
            ready, _ = ray.wait(
                list(pending), num_returns=max(1, len(pending) // 20), timeout=PROGRESS_SECONDS
            )
            for ref in ready:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                done += 1
                if on_result is not None:
                    on_result(i, results[i])
            if time.monotonic() - last >= PROGRESS_SECONDS and pending:
                logger.info("%s: %d/%d tasks done", stage, done, len(calls))
                last = time.monotonic()
    finally:
        for ref in pending:
            ray.cancel(ref)
    return results
