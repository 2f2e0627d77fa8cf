"""RETRO model: a decoder with chunked cross-attention to retrieved neighbours. Plain PyTorch."""

from retro_model.config import PRESETS, RetroConfig, paper_cca_layers

__all__ = ["PRESETS", "RetroConfig", "paper_cca_layers"]
