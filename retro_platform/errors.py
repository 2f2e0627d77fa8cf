"""User-facing errors: each says what was wrong and what to change. The CLI prints them as one line."""

from __future__ import annotations


class RetroError(Exception):
    """Base of every error caused by input (files, config, database, checkpoint), not by a bug."""


class ConfigError(RetroError, ValueError):
    """A config value, file or override is wrong: the message names the setting and what it accepts.

    Also a ValueError, as config validation raised before this class existed."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file or preset named on the command line does not exist."""


class UserError(RetroError):
    """An error in the command line itself (e.g. two options that exclude each other)."""


class CorpusError(RetroError):
    """A corpus file is malformed: the message names the file, the line/row and the problem."""


class DatabaseError(RetroError):
    """A database is missing, partial, corrupt, or incompatible with what asks for it."""


class CheckpointError(RetroError):
    """A checkpoint is missing, corrupt, or does not match the database/config."""


class TrackingError(RetroError):
    """The MLflow tracking store cannot be reached or created."""


class StorageError(RetroError, OSError):
    """A storage location (local/NFS path or ``s3://bucket/prefix``) cannot be used: the message says
    what to change (credentials, bucket, endpoint, permissions). Also an OSError, like the I/O errors
    it replaces."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A file or object that was asked for does not exist (the bucket itself does: a missing bucket is a
    plain StorageError, never this, so "not built yet" logic catching FileNotFoundError cannot hide it)."""


class NeighborSearchTimeout(RetroError, TimeoutError):
    """No replica of an index shard answered a neighbour search within ``pool.search_timeout_s``."""


class ReplicaPlacementError(RetroError):
    """The neighbour pool's replicas cannot be placed as ``pool.replica_spread`` asks (too few nodes)."""
