"""The project tokenizer: byte-level BPE training, special tokens, loading, saving."""

from __future__ import annotations

import json

import pytest

from retro_platform.config import CorpusConfig, TokenizerConfig
from retro_platform.db.corpus import load_documents
from retro_platform.db.tokenizer import (
    EOD,
    PAD,
    eod_id,
    load_tokenizer,
    load_tokenizer_file,
    pad_id,
    save_tokenizer_atomic,
    train_tokenizer,
)
from retro_platform.errors import DatabaseError


@pytest.fixture(scope="module")
def texts():
    corpus = load_documents(CorpusConfig(max_documents=200, valid_fraction=0.0), use_ray=False)
    return [d["text"] for d in corpus.train]


def test_trained_bpe_has_pad_0_eod_1_and_round_trips(texts, tmp_path):
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=1024))
    assert tok.get_vocab_size() == 1024
    assert pad_id(tok) == 0 and eod_id(tok) == 1
    for text in [texts[0], "naïve café — 東京 🙂", "  leading spaces\n\ttabs"]:
        ids = tok.encode(text).ids
        assert PAD not in tok.decode(ids) and tok.decode(ids) == text  # byte-level: lossless
    # any bytes are representable: no unknown token
    assert all(t is not None for t in tok.encode("\x00\x7f\u2603").ids)


def test_training_is_deterministic_and_save_load_round_trips(texts, tmp_path):
    first = train_tokenizer(texts, TokenizerConfig(vocab_size=1024))
    second = train_tokenizer(texts, TokenizerConfig(vocab_size=1024))
    assert first.to_str() == second.to_str()
    path = tmp_path / "db" / "tokenizer.json"
    save_tokenizer_atomic(first, path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    loaded = load_tokenizer(tmp_path / "db")
    assert loaded.encode(texts[1]).ids == first.encode(texts[1]).ids


def test_loading_refuses_missing_corrupt_and_pad_less_tokenizers(texts, tmp_path):
    with pytest.raises(DatabaseError, match="does not exist"):
        load_tokenizer_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatabaseError, match="not a valid tokenizer.json"):
        load_tokenizer_file(bad)
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != PAD]
    del data["model"]["vocab"][PAD]
    no_pad = tmp_path / "no_pad.json"
    no_pad.write_text(json.dumps(data))
    with pytest.raises(DatabaseError, match="has no <pad> token"):
        load_tokenizer_file(no_pad)
    assert EOD in tok.get_vocab()


def test_database_tokenizer_is_the_one_its_chunks_use(debug_db):
    config, manifest = debug_db
    tok = load_tokenizer(config.db_path)
    assert tok.get_vocab_size() == manifest.tokenizer.vocab_size == config.database.tokenizer.vocab_size
    assert pad_id(tok) == manifest.tokenizer.pad_id == 0
