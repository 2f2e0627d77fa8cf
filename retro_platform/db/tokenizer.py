"""The project tokenizer: a byte-level BPE trained on the training documents, or any tokenizer.json.

Token 0 is ``<pad>`` (the model's pad id) and token 1 ``<eod>`` (appended to every document), so the
database, the model and generation agree on both. A loaded tokenizer.json must define ``<pad>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retro_platform import storage
from retro_platform.config import TokenizerConfig
from retro_platform.db.layout import DatabaseLayout
from retro_platform.errors import DatabaseError

PAD = "<pad>"
"""Padding token (id 0 in trained tokenizers)."""
EOD = "<eod>"
"""End-of-document token (id 1 in trained tokenizers)."""


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE with ``config.vocab_size`` tokens on ``texts``.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[PAD, EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (local path or ``s3://`` URI), checking it defines the padding token."""
    if not storage.exists(path):
        raise DatabaseError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_str(storage.read_bytes(path).decode("utf-8"))
    except Exception as exc:  # tokenizers raises a plain Exception for bad JSON
        raise DatabaseError(f"{path} is not a valid tokenizer.json: {exc}") from None
    if tokenizer.token_to_id(PAD) is None:
        raise DatabaseError(f"tokenizer {path} has no {PAD} token; add it as a special token")
    return tokenizer


def load_tokenizer(db_path: str | Path) -> Tokenizer:
    """The tokenizer of the database at ``db_path`` (its ``tokenizer.json``)."""
    return load_tokenizer_file(DatabaseLayout(db_path).tokenizer)


def save_tokenizer_atomic(tokenizer: Tokenizer, path: str | Path) -> str:
    """Save a tokenizer.json atomically (never a half-written file) -> its sha256."""
    return storage.write_path_atomic(path, lambda tmp: tokenizer.save(str(tmp)), checksum=True).sha256


def pad_id(tokenizer: Tokenizer) -> int:
    """Id of ``<pad>``."""
    return tokenizer.token_to_id(PAD)


def eod_id(tokenizer: Tokenizer) -> int | None:
    """Id of ``<eod>``, or None when the tokenizer has none."""
    return tokenizer.token_to_id(EOD)
