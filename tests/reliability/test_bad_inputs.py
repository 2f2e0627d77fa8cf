"""Bad input gets one clear line (exit code 2) and leaves nothing behind.

Every case goes through the CLI entry point (`retro_platform.cli.main`, what `retro ...` runs), checks
the message names the problem (and the file or setting to change), and checks that no output was
written: no database folder for a refused build, no MLflow store for a refused command, and an
existing database byte-for-byte unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.checkpoints import model_for_database
from retro_platform.cli import main

CORPORA = {
    "malformed JSONL line": (
        b'{"id": "a", "text": "fine"}\n{"id": "b", "text": \n',
        "line 2: malformed JSON",
    ),
    "duplicate document ids": (
        b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
        "line 2: duplicate document id 'a'",
    ),
    "non-UTF-8 bytes": (b'{"id": "a", "text": "caf\xe9"}\n', "line 1: not valid UTF-8"),
    "empty corpus": (b'{"id": "a", "text": ""}\n{"id": "b", "text": "   "}\n', "no non-empty documents"),
    "document without id": (b'{"text": "no id here"}\n', "line 1: missing 'id'"),
    "text that is not a string": (b'{"id": "a", "text": 42}\n', "'text' of document 'a' must be a string"),
}


def run_cli(capsys, *argv: str) -> str:
    """Run `retro argv...`, expect exit code 2 -> its one-line error message."""
    capsys.readouterr()
    assert main(list(argv)) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # libraries may log above it (MLflow creating its store)
    assert last.startswith(f"retro {argv[0]}: error:"), err
    return last


def refused_build(capsys, work, *settings: str) -> str:
    """`retro build-db --config debug --set work_dir=<work> --set <setting>...` -> its error line."""
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    return run_cli(capsys, "build-db", "--config", "debug", "--set", f"work_dir={work}", *overrides)


def files_under(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root (empty if it does not exist)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CORPORA))
def test_bad_corpus_is_refused_naming_file_and_line_and_nothing_is_written(
    ray_session, tmp_path, capsys, case
):
    content, message = CORPORA[case]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(content)
    work = tmp_path / "work"
    err = refused_build(capsys, work, f"database.corpus.source={corpus}")
    assert message in err and str(corpus) in err
    assert not (work / "db").exists()


@pytest.mark.parametrize(
    "setting,message",
    [
        ("database.chunk_lenght=64", "unknown"),  # a key that does not exist
        ("database.chunk_len=0", "database.chunk_len"),  # out of range
        ("database.num_shards=-1", "database.num_shards"),
        ("train.steps=many", "train.steps"),  # wrong type
        ("pool.search_timeout_s=0", "pool.search_timeout_s: must be > 0"),
        ("pool.search_timeout_s=-5", "pool.search_timeout_s: must be > 0"),
        ("pool.replica_spread=everywhere", "pool.replica_spread: must be one of auto, strict, best_effort"),
        ("pool.placement_timeout_s=0", "pool.placement_timeout_s: must be > 0"),
        ("ray.node_ip_address=' '", "ray.node_ip_address"),
    ],
)
def test_bad_config_values_name_the_setting_and_write_nothing(tmp_path, capsys, setting, message):
    work = tmp_path / "work"
    err = refused_build(capsys, work, setting)
    assert message in err
    assert not work.exists()


def test_unknown_preset_and_missing_corpus_file(tmp_path, capsys):
    err = run_cli(capsys, "build-db", "--config", "no-such-preset", "--set", f"work_dir={tmp_path}")
    assert "no preset named 'no-such-preset'" in err and "debug" in err
    missing = tmp_path / "missing.jsonl"
    err = refused_build(capsys, tmp_path, f"database.corpus.source={missing}")
    assert str(missing) in err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize(
    "factory,message",
    [("IVF1024,PQ8", "needs at least 1024 training vectors"), ("NotAnIndex", "not a valid FAISS factory")],
)
def test_index_that_cannot_be_built_is_refused_before_anything_is_written(
    ray_session, tmp_path, capsys, factory, message
):
    work = tmp_path / "work"
    err = refused_build(capsys, work, f"database.index.factory={factory}")
    assert message in err and "database.index.factory" in err
    assert not (work / "db").exists()


def test_unreachable_tracking_uri_fails_fast_and_writes_nothing(ray_session, tmp_path, capsys):
    work = tmp_path / "work"
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens there
    err = refused_build(capsys, work, f"tracking.uri={uri}")
    assert uri in err and "cannot be reached" in err and "tracking.uri" in err
    assert not (work / "db").exists()


def test_missing_database_names_the_folder_and_the_command_that_builds_it(ray_session, tmp_path, capsys):
    work = tmp_path / "empty"
    for command in (["train"], ["query-neighbors"], ["neighbors", "--chunk-id", "0"]):
        err = run_cli(capsys, *command, "--config", "debug", "--set", f"work_dir={work}")
        assert str(work / "db") in err and "build-db" in err
    assert files_under(work) == {}


@pytest.fixture
def database_copy(debug_db, tmp_path):
    """(config, manifest, work dir) of a private copy of the debug database."""
    source, manifest = debug_db
    work = tmp_path / "work"
    shutil.copytree(source.db_path, work / "db")
    return debug_config(work, "tracking.experiment=bad-inputs"), manifest, work


def test_k_larger_than_the_index_is_refused(database_copy, capsys):
    config, manifest, work = database_copy
    before = files_under(work)
    total = sum(s.n_vectors for s in manifest.index.shards)
    common = ["--config", "debug", "--set", f"work_dir={work}"]
    err = run_cli(capsys, "neighbors", *common, "--chunk-id", "0", "--k", str(total + 1))
    assert str(total) in err and "--k" in err
    err = run_cli(capsys, "train", *common, "--set", f"model.num_neighbors={total + 1}")
    assert "model.num_neighbors" in err and str(total) in err
    assert files_under(work) == before


def test_checkpoint_that_does_not_match_the_database_is_refused(database_copy, capsys):
    config, manifest, work = database_copy
    matched = model_for_database(config, manifest).model
    torch.manual_seed(0)
    foreign_tokenizer = work / "foreign-tokenizer"
    save_model_dir(foreign_tokenizer, Retro(matched), extra={"step": 0, "tokenizer_sha256": "f" * 64})
    other_chunk_len = work / "chunk-32"
    save_model_dir(
        other_chunk_len,
        Retro(dataclasses.replace(matched, chunk_len=32)),
        extra={"step": 0, "tokenizer_sha256": manifest.tokenizer.sha256},
    )
    before = files_under(work)
    common = ["--config", "debug", "--set", f"work_dir={work}", "--set", "tracking.experiment=bad-inputs"]
    for command in (["eval"], ["generate", "--prompt", "hello"]):
        err = run_cli(capsys, *command, *common, "--checkpoint", str(foreign_tokenizer))
        assert "tokenizer" in err and str(foreign_tokenizer) in err
        err = run_cli(capsys, *command, *common, "--checkpoint", str(other_chunk_len))
        assert "chunk" in err and "32" in err and "64" in err
    assert files_under(work) == before


def test_bad_documents_for_add_docs_leave_the_database_untouched(database_copy, capsys, tmp_path):
    config, manifest, work = database_copy
    before = files_under(work / "db")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "new", "text": "fine"}\n{"id": \n')
    err = run_cli(capsys, "add-docs", "--config", "debug", "--set", f"work_dir={work}", str(bad))
    assert "line 2" in err and str(bad) in err
    existing_id = json.dumps({"id": "dup", "text": "x"}) + "\n"
    (tmp_path / "twice.jsonl").write_text(existing_id * 2)
    err = run_cli(
        capsys, "add-docs", "--config", "debug", "--set", f"work_dir={work}", str(tmp_path / "twice.jsonl")
    )
    assert "document id 'dup'" in err
    existing = pq.read_table(work / "db" / "chunks" / "train" / "shard-0000.parquet", columns=["doc_key"])
    taken = tmp_path / "taken.jsonl"
    taken.write_text(
        json.dumps({"id": "fresh", "text": "x"})
        + "\n"
        + json.dumps({"id": existing["doc_key"][0].as_py(), "text": "y"})
        + "\n"
    )
    err = run_cli(capsys, "add-docs", "--config", "debug", "--set", f"work_dir={work}", str(taken))
    assert f"{taken}, line 2" in err and "already in the database" in err
    assert files_under(work / "db") == before
    assert sorted(p.name for p in work.iterdir()) == ["db"]  # no staging folder left beside it
