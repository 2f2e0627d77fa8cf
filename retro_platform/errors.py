"""User-facing errors: each says what was wrong and what to change. The CLI prints them as one line."""

from __future__ import annotations


class RetroError(Exception):
    """Base of every error caused by input (files, config, database, checkpoint), not by a bug."""


class CorpusError(RetroError):
    """A corpus file is malformed: the message names the file, the line/row and the problem."""


class DatabaseError(RetroError):
    """A database is missing, partial, corrupt, or incompatible with what asks for it."""


class CheckpointError(RetroError):
    """A checkpoint is missing, corrupt, or does not match the database/config."""


class TrackingError(RetroError):
    """The MLflow tracking store cannot be reached or created."""
