"""Save and load a Retro model with the config that built it (safetensors; no pickle).

A model directory holds ``model.safetensors`` (weights, with the RetroConfig and any extra JSON-able
metadata in the safetensors header), so ``load_model_dir`` rebuilds the exact model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from retro_model.config import RetroConfig
from retro_model.model import Retro

WEIGHTS_FILE = "model.safetensors"
"""File name of the weights inside a model directory."""


def _unwrap(model: torch.nn.Module) -> Retro:
    """The Retro inside a DDP / compiled wrapper."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, Retro):
        raise TypeError(f"expected a Retro model, got {type(inner).__name__}")
    return inner


def save_checkpoint(path: str | Path, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write the weights and config (plus ``extra`` JSON metadata) to one safetensors file."""
    retro = _unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # tied weights are stored once: the head shares the embedding
    state = {k: v.detach().cpu().contiguous() for k, v in retro.state_dict().items()}
    if retro.config.tie_embeddings:
        state.pop("head.weight", None)
    metadata = {"retro_config": json.dumps(retro.config.to_dict()), "extra": json.dumps(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_checkpoint_metadata(path: str | Path) -> tuple[RetroConfig, dict[str, Any]]:
    """The RetroConfig and extra metadata of a checkpoint file, without loading the weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    return config_from_metadata(metadata, str(path))


def config_from_metadata(metadata: dict[str, str], source: str) -> tuple[RetroConfig, dict[str, Any]]:
    """The RetroConfig and extra metadata from a checkpoint's safetensors metadata (``source`` names
    the file in errors)."""
    if "retro_config" not in metadata:
        raise ValueError(f"checkpoint {source} has no retro_config metadata: not written by save_checkpoint")
    values = json.loads(metadata["retro_config"])
    # fields added after checkpoints were written: those checkpoints used what the field's value names
    values.setdefault("activation", "gelu_tanh")
    values.setdefault("cross_positions", "none")
    values.setdefault("copy_init", 0.0)
    values.setdefault("neighbor_alignment", "none")
    return RetroConfig.from_dict(values), json.loads(metadata.get("extra", "{}"))


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[Retro, dict[str, Any]]:
    """Rebuild the model saved by ``save_checkpoint`` -> (model in eval mode, extra metadata)."""
    config, extra = read_checkpoint_metadata(path)
    model = Retro(config)
    state = load_file(str(path), device=map_location)
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(map_location).eval(), extra


def save_model_dir(
    directory: str | Path, model: torch.nn.Module, extra: dict[str, Any] | None = None
) -> Path:
    """Save into ``directory/model.safetensors`` (the form checkpoints and MLflow artifacts use)."""
    return save_checkpoint(Path(directory) / WEIGHTS_FILE, model, extra)


def load_model_dir(directory: str | Path, map_location: str = "cpu") -> tuple[Retro, dict[str, Any]]:
    """Load a model saved with ``save_model_dir``."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}: not a model directory")
    return load_checkpoint(path, map_location)
