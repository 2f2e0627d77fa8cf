"""Checkpoints: where they are, whether one fits a database and a config, and the training state in them.

A checkpoint is a directory written by ``retro train`` (``retro_model.checkpoint``): ``model.safetensors``
(weights, the RetroConfig, and metadata such as the step, the run id and the tokenizer's sha256) and
``train_state.pt`` (optimizer, schedule, step, data position). Every command that reads one comes here:
``retro train`` to resume or to retro-fit (``train.init_from``), ``retro eval`` and ``retro generate`` to
load one for a database.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from retro_model.checkpoint import (
    WEIGHTS_FILE,
    config_from_metadata,
    load_model_dir,
    read_checkpoint_metadata,
    save_model_dir,
)
from retro_model.model import Retro
from retro_model.retrofit import RetrofitPlan, copy_matching_weights, plan_copy
from retro_platform import storage as _storage
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import Manifest
from retro_platform.errors import CheckpointError, DatabaseError

logger = logging.getLogger(__name__)


STATE_FILE = "train_state.pt"
"""Optimizer, scheduler, step, data position and config inside a checkpoint directory."""


def save_training_state(
    directory: Path,
    model: Retro,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    position: int,
    config: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """Write a checkpoint: model.safetensors (weights, RetroConfig, ``extra``) + train_state.pt."""
    save_model_dir(directory, model, extra={**extra, "step": step})
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "data_position": position,
            "config": config,
        },
        directory / STATE_FILE,
    )


def load_training_state(
    directory: str | Path, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[int, int]:
    """Restore optimizer and scheduler from a checkpoint (``weights_only``: no code runs) -> (step, position).

    The model weights are loaded separately, before DDP wraps the model.
    """
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds something other than tensors and plain containers; it was not loaded (no "
            f"code from checkpoints is ever run). Remove that checkpoint or start a new train.name ({exc})"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["data_position"])


def init_from_checkpoint(model: Retro, directory: str | Path) -> RetrofitPlan:
    """Copy the tensors a checkpoint shares with ``model`` (same name and shape) into it -> the plan.

    Retrieval tensors the checkpoint lacks (a decoder-only baseline's) keep their initialisation.
    CheckpointError when the checkpoint does not fit (the driver checks this before training starts).
    """
    path = local_checkpoint(directory) / WEIGHTS_FILE
    try:
        return copy_matching_weights(model, load_file(str(path), device="cpu"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"train.init_from: checkpoint {path} does not fit the model: {exc}") from None


def model_for_database(config: PlatformConfig, manifest: Manifest) -> PlatformConfig:
    """Config whose model matches the database: vocab size and pad id from its tokenizer; chunk length checked."""
    if config.model.chunk_len != manifest.chunk_len:
        raise DatabaseError(
            f"model.chunk_len={config.model.chunk_len} but the database {config.db_path} was built with "
            f"chunk_len={manifest.chunk_len}; set model.chunk_len and database.chunk_len to "
            f"{manifest.chunk_len} (or build a database with chunk_len={config.model.chunk_len})"
        )
    indexed = manifest.index.num_vectors
    if config.model.retrieval and config.model.num_neighbors > indexed:
        raise DatabaseError(
            f"model.num_neighbors={config.model.num_neighbors} but the index of {config.db_path} holds "
            f"only {indexed} chunks; set model.num_neighbors to at most {indexed} (the paper uses 2-40)"
        )
    tok = manifest.tokenizer
    model = dataclasses.replace(config.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return dataclasses.replace(config, model=model)


def latest_checkpoint(storage: Path | str, name: str) -> Path | str | None:
    """The checkpoint with the highest step under ``<storage>/<name>``, if any (a Path, or a URI string
    on object storage); only the safetensors headers are read."""
    run_dir = _storage.join(str(storage), name)
    files = _storage.list_stats(run_dir)
    found = []
    for relative, stat in files.items():
        folder, _, leaf = relative.rpartition("/")
        if leaf != WEIGHTS_FILE or (f"{folder}/{STATE_FILE}" if folder else STATE_FILE) not in files:
            continue
        try:
            _, extra = checkpoint_metadata(_storage.join(run_dir, relative))
        except (ValueError, FileNotFoundError):
            continue  # a checkpoint being written or deleted
        found.append((int(extra.get("step", 0)), stat.mtime_ns or 0, _storage.join(run_dir, folder)))
    if not found:
        return None
    newest = max(found)[2]
    return newest if _storage.is_remote(newest) else Path(newest)


def checkpoint_metadata(location: Path | str) -> tuple[Any, dict[str, Any]]:
    """``read_checkpoint_metadata`` of a checkpoint file at any location, from its header alone (the
    safetensors format: 8 bytes of header length, then the JSON header with ``__metadata__``)."""
    with _storage.open_input(location) as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                raise ValueError("header too long")
            header = json.loads(f.read(length))
        except (struct.error, ValueError) as exc:
            raise ValueError(f"checkpoint {location} is not a readable safetensors file ({exc})") from None
    return config_from_metadata(header.get("__metadata__") or {}, str(location))


def local_checkpoint(checkpoint: Path | str) -> Path:
    """A checkpoint directory on this node: the directory itself, or the node-local cache's copy of one
    on object storage (``storage.local_folder``: fetched once per node and version)."""
    return _storage.local_folder(str(checkpoint))


def other_tokenizer(extra: dict[str, Any], manifest: Manifest) -> bool:
    """True when a checkpoint's metadata ``extra`` records a tokenizer other than the database's
    (checkpoints without the record are taken as matching)."""
    sha = extra.get("tokenizer_sha256")
    return bool(sha) and sha != manifest.tokenizer.sha256


def check_resumable(config: PlatformConfig, checkpoint: Path | str, manifest: Manifest) -> dict[str, Any]:
    """Refuse to resume a checkpoint of another model or tokenizer -> its metadata."""
    model_cfg, extra = checkpoint_metadata(_storage.join(str(checkpoint), WEIGHTS_FILE))
    if model_cfg != config.model:
        mine, theirs = config.model.to_dict(), model_cfg.to_dict()
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise CheckpointError(
            f"train.name={config.train.name!r} already has a checkpoint ({checkpoint}) of a different model "
            f"(checkpoint vs config: {diff}); use a new train.name, or delete {_storage.parent(str(checkpoint))} to start over"
        )
    if other_tokenizer(extra, manifest):
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained with another tokenizer than the one of {config.db_path}; "
            "train on the database it was trained with, or use a new train.name"
        )
    frozen = extra.get("freeze", "none")
    if frozen != config.train.freeze:
        raise CheckpointError(
            f"train.name={config.train.name!r} already has a checkpoint ({checkpoint}) trained with "
            f"train.freeze={frozen}, but train.freeze={config.train.freeze} now (its optimizer state holds "
            f"other parameters); set train.freeze={frozen}, or use a new train.name"
        )
    return extra


DECODER_SETTINGS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "tie_embeddings",
    "activation",
    "rope_base",
    "norm_eps",
    "pad_id",
)
"""RetroConfig fields that shape or change the decoder a ``train.init_from`` checkpoint provides."""


def find_init_checkpoint(config: PlatformConfig) -> Path | str:
    """The checkpoint directory ``train.init_from`` names: a directory holding model.safetensors, or a
    run directory (``<storage_path>/<name>``: its newest checkpoint). Relative paths are under work_dir;
    either may be on object storage (``s3://``)."""
    path = config.resolve(config.train.init_from)
    if _storage.is_remote(str(path)):
        setting = f"train.init_from={config.train.init_from!r}"
        names = _storage.list_files(path)
        if WEIGHTS_FILE in names:
            return path
        newest = latest_checkpoint(_storage.parent(path), _storage.basename(path))
        if newest is None or _storage.parent(newest) != path:
            raise CheckpointError(
                f"{setting}: {path} holds no checkpoint of its own; set train.init_from to a checkpoint "
                "directory (one holding model.safetensors) or to a run directory <storage_path>/<train.name>"
            )
        return newest
    fix = (
        "set train.init_from to a checkpoint directory (one holding model.safetensors, e.g. "
        "<storage_path>/<baseline train.name>/checkpoint_*) or to a run directory <storage_path>/<train.name>"
    )
    setting = f"train.init_from={config.train.init_from!r}"
    if not path.exists():
        raise CheckpointError(f"{setting}: {path} does not exist; {fix}")
    if not path.is_dir():
        raise CheckpointError(f"{setting}: {path} is a file, not a directory; {fix}")
    if (path / WEIGHTS_FILE).exists():
        return path
    newest = latest_checkpoint(path.parent, path.name)
    if newest is None:
        raise CheckpointError(f"{setting}: {path} holds no checkpoint; {fix}")
    if newest.parent != path:  # e.g. the storage path itself: which run is meant is not clear
        raise CheckpointError(
            f"{setting}: {path} holds no checkpoint of its own, only in subfolders such as {newest.parent}; {fix}"
        )
    return newest


def check_init_from(config: PlatformConfig, checkpoint: Path | str, manifest: Manifest) -> RetrofitPlan:
    """Refuse a ``train.init_from`` checkpoint that cannot start this model -> what will be copied.

    Refused (CheckpointError naming what to change): an unreadable checkpoint, another tokenizer than the
    database's, a tensor of both with another shape or a decoder tensor only one side has. Settings that
    change no shape but the computation (e.g. model.activation) only get a warning. Reads the safetensors
    header only: no weights are loaded.
    """
    weights = local_checkpoint(checkpoint) / WEIGHTS_FILE
    try:
        source_cfg, extra = read_checkpoint_metadata(weights)
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"train.init_from: {exc}; point train.init_from to a checkpoint written by retro train"
        ) from None
    if other_tokenizer(extra, manifest):
        raise CheckpointError(
            f"train.init_from: checkpoint {checkpoint} was trained with another tokenizer than the one of "
            f"{config.db_path}, so its token ids mean other things; init from a checkpoint trained on this "
            "database (or set database.path to the database it was trained on)"
        )
    mine, theirs = config.model.to_dict(), source_cfg.to_dict()
    differ = {k: (theirs[k], mine[k]) for k in DECODER_SETTINGS if theirs[k] != mine[k]}
    with torch.device("meta"):  # shapes only, no memory
        target = Retro(config.model)
    try:
        if "n_heads" in differ:  # same shapes, but every attention weight would be split differently
            raise ValueError("another number of attention heads")
        plan = plan_copy(target, shapes)
    except ValueError as exc:
        raise CheckpointError(
            f"train.init_from: checkpoint {checkpoint} does not fit the model: {exc}. Decoder settings of "
            f"the checkpoint vs this config: {differ}; set model.* like the checkpoint, or init from "
            "another checkpoint"
        ) from None
    if differ:
        logger.warning(
            "train.init_from: the checkpoint %s was trained with other decoder settings (checkpoint vs "
            "config: %s); its weights are copied anyway",
            checkpoint,
            differ,
        )
    return plan


def find_checkpoint(config: PlatformConfig, checkpoint: str | Path | None) -> Path | str:
    """Where a checkpoint is (a local directory or a URI): an explicit one, or the newest one of the run
    ``train.name``; nothing is downloaded."""
    if checkpoint:
        path = str(checkpoint) if _storage.is_remote(str(checkpoint)) else Path(checkpoint).expanduser()
        if not _storage.exists(path) and not _storage.list_files(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    found = latest_checkpoint(config.storage_path, config.train.name)
    if found is None:
        raise CheckpointError(
            f"no checkpoint of run {config.train.name!r} under {config.storage_path}; "
            "train first, set train.name, or pass --checkpoint DIR"
        )
    return found


def resolve_checkpoint(config: PlatformConfig, checkpoint: str | Path | None) -> Path:
    """``find_checkpoint``, as a directory on this node (a cached copy of one on object storage)."""
    return local_checkpoint(find_checkpoint(config, checkpoint))


def load_compatible_model(config: PlatformConfig, checkpoint: Path, manifest: Manifest, warn: bool = True):
    """Load a checkpoint and refuse it when it does not match the database -> (model, extra)."""
    try:
        model, extra = load_model_dir(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    check_compatible(config, checkpoint, manifest, (model.config, extra), warn)
    return model, extra


def check_compatible(
    config: PlatformConfig,
    checkpoint: Path | str,
    manifest: Manifest,
    metadata: tuple[Any, dict[str, Any]] | None = None,
    warn: bool = True,
) -> dict[str, Any]:
    """Refuse a checkpoint whose model does not match the database (chunk length, vocabulary, tokenizer)
    -> its metadata. Reads only the checkpoint's header (``metadata``: already read) and works on object
    storage, so a driver can refuse it before a task loads the weights."""
    if metadata is None:
        weights = _storage.join(str(checkpoint), WEIGHTS_FILE)
        try:
            metadata = checkpoint_metadata(weights)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
    model_config, extra = metadata
    if model_config.chunk_len != manifest.chunk_len:
        raise CheckpointError(
            f"checkpoint {checkpoint} has chunk_len {model_config.chunk_len} but database {config.db_path} "
            f"has {manifest.chunk_len}: evaluate it on the database it was trained with"
        )
    if model_config.vocab_size != manifest.tokenizer.vocab_size:
        raise CheckpointError(
            f"checkpoint {checkpoint} has vocab_size {model_config.vocab_size} but the tokenizer of "
            f"{config.db_path} has {manifest.tokenizer.vocab_size}: it was trained with another tokenizer"
        )
    if other_tokenizer(extra, manifest):
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained with another tokenizer than the one of {config.db_path} "
            "(same vocabulary size, different tokens): evaluate it on the database it was trained with"
        )
    if warn and extra.get("db_id") and extra["db_id"] != manifest.db_id:
        logger.warning(
            "checkpoint %s was trained on database %s, evaluating on %s",
            checkpoint,
            extra["db_id"],
            manifest.db_id,
        )
    return extra
