"""RETRO platform on Ray: database build, neighbour pool, distributed training, MLflow tracking."""

from retro_platform.config import PlatformConfig, load_config

__all__ = ["PlatformConfig", "load_config"]
