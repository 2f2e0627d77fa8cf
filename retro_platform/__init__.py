"""RETRO platform on Ray: database build, neighbour pool, distributed training, MLflow tracking."""

from retro_platform.config import PlatformConfig, load_config
from retro_platform.output import quiet_dependency_loggers

# before any module of the package imports faiss, whose loader logs its CPU probes at INFO (`retro -v`
# shows them): in the driver and in every Ray worker that runs the package's code
quiet_dependency_loggers()

__all__ = ["PlatformConfig", "load_config"]
