"""`retro demo` on any corpus: its checks refuse bad input before any work, and a corpus without a cut
gets one document held out of the database (and of training) for the knowledge update.

Real parts only: the packaged Wikipedia, real JSON Lines files, real database builds on the session's
Ray (the debug database of ``conftest.py``, and one small build from a JSON Lines corpus).
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import debug_config

from retro_platform.commands.demo import (
    DEMO_PROMPT,
    HOLD_OUT_BYTES_PER_TOKEN,
    check_built_database,
    check_demo,
    run_demo,
    unseen_document,
    update_tokens,
)
from retro_platform.db.corpus import WIKIPEDIA, load_documents, read_documents
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.tokenizer import load_tokenizer
from retro_platform.errors import ConfigError, CorpusError, DatabaseError


def database_ids(db_path, manifest) -> set[str]:
    """The corpus ids of every document in a database's chunk store (every split)."""
    layout = DatabaseLayout(db_path)
    tables = [
        pq.read_table(layout.chunks(split, s.shard), columns=["doc_key"])
        for split, shards in manifest.splits.items()
        for s in shards
    ]
    return set(pa.concat_tables(tables).column("doc_key").to_pylist())


def write_jsonl(path, docs) -> str:
    """A JSON Lines corpus of ``(id, text)`` pairs -> its path as a string."""
    path.write_text("".join(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in docs))
    return str(path)


def wikipedia_texts(n: int) -> list[str]:
    """The first ``n`` non-empty packaged Wikipedia summaries (real text for a user's corpus)."""
    return [d["text"] for d in read_documents(WIKIPEDIA, use_ray=False) if d["text"].strip()][:n]


def first_long(docs, min_tokens: int) -> dict:
    """The first document with ``min_tokens`` tokens at the demo's bytes-per-token estimate."""
    return next(d for d in docs if len(d["text"].encode("utf-8")) >= min_tokens * HOLD_OUT_BYTES_PER_TOKEN)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        pytest.param(
            ["database.corpus.source={tmp}/missing.jsonl"], CorpusError, "does not exist", id="missing corpus"
        ),
        pytest.param(
            ["database.corpus.max_documents=20000"],
            CorpusError,
            r"beyond the first 20000 .* there is none: .*set it to null",
            id="Wikipedia cut past its end",
        ),
        pytest.param(
            ["database.corpus.source={tmp}/short.jsonl"],
            CorpusError,
            r"no document is long enough: it needs 152 tokens .*Lower generate.max_new_tokens",
            id="no document long enough",
        ),
        pytest.param(
            ["database.corpus.source={tmp}/single.jsonl"],
            CorpusError,
            r"no document besides 'only' .*single\.jsonl, line 1.*: add documents",
            id="a single document",
        ),
        pytest.param(
            ["generate.max_new_tokens=600"],
            ConfigError,
            r"generate.max_new_tokens: .*664 in all, more than model.max_seq_len=512",
            id="generation longer than the model",
        ),
        pytest.param(
            ["database.corpus.valid_fraction=0"], ConfigError, "evaluates both models", id="no valid split"
        ),
        pytest.param(
            ["database.path=s3://bucket/db"], ConfigError, "runs on local folders", id="remote database"
        ),
    ],
)
def test_demo_refuses_what_a_later_step_would_refuse_before_any_work(tmp_path, overrides, error, message):
    """Each input a later step (the build, evaluation, generation, the knowledge update) would refuse is
    refused by `run_demo` itself before the first stage: nothing is written, not even the work folder."""
    write_jsonl(tmp_path / "short.jsonl", [(f"s{i}", "A short note.") for i in range(5)])
    write_jsonl(tmp_path / "single.jsonl", [("only", " ".join(wikipedia_texts(3)))])
    work = tmp_path / "work"
    config = debug_config(work, *(o.format(tmp=tmp_path) for o in overrides))
    with pytest.raises(error, match=message):
        run_demo(config)
    assert not work.exists()  # no database, no MLflow store, no checkpoints


def test_wikipedia_without_a_cut_holds_its_first_long_article_out(tmp_path):
    """The packaged Wikipedia with max_documents=null: the first article long enough for the knowledge
    update is listed in exclude_ids (next to the user's own), so the corpus the build reads lacks it."""
    config = debug_config(tmp_path / "work", "database.corpus.max_documents=null")
    ran, held_out = check_demo(config)
    docs = [d for d in read_documents(WIKIPEDIA, use_ray=False) if d["text"].strip()]
    expected = first_long(docs, update_tokens(config))
    assert held_out["id"] == expected["id"] and held_out["text"] == expected["text"]
    assert ran.database.corpus.exclude_ids == [expected["id"]]
    assert config.database.corpus.exclude_ids == []  # the caller's config is left as it was
    corpus = load_documents(ran.database.corpus, use_ray=False)
    kept = {d["id"] for d in corpus.train + corpus.valid}
    assert expected["id"] not in kept and len(kept) == len(docs) - 1
    # an exclusion of the user's own is kept; the held-out article joins it
    own = debug_config(
        tmp_path / "work",
        "database.corpus.max_documents=null",
        f"database.corpus.exclude_ids=[{docs[0]['id']!r}]",
    )
    assert check_demo(own)[0].database.corpus.exclude_ids[-1] == expected["id"]
    assert not (tmp_path / "work").exists()


def test_with_a_cut_the_update_article_is_absent_and_other_settings_are_refused_early(debug_db, tmp_path):
    """The debug database (Wikipedia, a cut at 300): nothing is held out, the knowledge update's article
    (beyond the cut) is not in the database, and a demo whose settings differ from the database at
    database.path is refused before the build rather than after it has read the corpus."""
    source, manifest = debug_db
    config, held_out = check_demo(source)
    assert held_out is None and config.database.corpus.exclude_ids == []
    tokenizer = load_tokenizer(source.db_path)
    doc = unseen_document(config, tokenizer, update_tokens(config))
    assert doc["id"].removeprefix("unseen-") not in database_ids(source.db_path, manifest)
    assert len(tokenizer.encode(doc["text"]).ids) >= update_tokens(config)

    work = tmp_path / "work"
    shutil.copytree(source.db_path, work / "db")
    check_demo(debug_config(work, "train.steps=5"))  # training settings do not change the database
    with pytest.raises(
        DatabaseError, match=r"different settings \(changed: corpus.exclude_ids, corpus.max_documents\)"
    ):
        check_demo(debug_config(work, "database.corpus.max_documents=null"))


def test_held_out_document_is_in_neither_the_database_nor_training(ray_session, tmp_path):
    """A user's JSON Lines corpus: `check_demo` holds out its first document long enough for the knowledge
    update; the database built from the config it returns holds every other document and not that one
    (training reads its sequences from the database), and the knowledge update then finds it."""
    from retro_platform.commands.build_db import build_database

    texts = wikipedia_texts(60)
    docs = [("note-0", "A short note."), ("note-1", "Another short note.")]
    docs += [(f"article-{i}", text) for i, text in enumerate(texts)]
    corpus = write_jsonl(tmp_path / "mine.jsonl", docs)
    config = debug_config(
        tmp_path / "work", f"database.corpus.source={corpus}", "database.corpus.max_documents=null"
    )
    need = update_tokens(config)
    expected = first_long([{"id": i, "text": t} for i, t in docs], need)
    ran, held_out = check_demo(config)
    assert held_out["id"] == expected["id"] != "note-0" and ran.database.corpus.exclude_ids == [
        expected["id"]
    ]
    assert held_out["where"] == f"{corpus}, line {[i for i, _ in docs].index(expected['id']) + 1}"

    manifest = build_database(ran)
    ids = database_ids(ran.db_path, manifest)
    assert expected["id"] not in ids and ids == {i for i, _ in docs} - {expected["id"]}
    assert sum(manifest.counts.documents.values()) == len(docs) - 1
    check_built_database(ran, manifest, DEMO_PROMPT)  # the tokenizer confirms the estimate
    tokenizer = load_tokenizer(ran.db_path)
    doc = unseen_document(ran, tokenizer, need)
    assert doc["id"] == f"unseen-{expected['id']}" and doc["text"] == held_out["text"]
    # were it too short for the real tokenizer, the message says what to change
    with pytest.raises(CorpusError, match=rf"too short: '{expected['id']}' has \d+; .*exclude_ids=\["):
        unseen_document(ran, tokenizer, 10**6)
    # without the hold-out the document would be in the database: the one built is not the default one
    assert expected["id"] in {d["id"] for d in read_documents(corpus, use_ray=False)}
