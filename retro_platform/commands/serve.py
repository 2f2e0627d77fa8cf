"""`retro serve`: the model service on Ray Serve (the deployments: ``retro_platform.serve.app``)."""

from __future__ import annotations

import dataclasses

from retro_platform.config import PlatformConfig
from retro_platform.errors import UserError
from retro_platform.serve.app import start_service


def serve_model(
    config: PlatformConfig,
    checkpoint: str | None = None,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> None:
    """Serve ``checkpoint`` (a directory) or ``model`` (an MLflow model URI), else ``serve.model`` or the
    run's latest checkpoint, on ``host``:``port`` (default: the config's, loopback) until interrupted."""
    if checkpoint and model:
        raise UserError("retro serve takes one of --checkpoint DIR or --model URI, not both")
    overrides = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, **overrides))
    start_service(config, checkpoint or model, blocking=True)
