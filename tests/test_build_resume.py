"""Resumes that skip what is current, retried transient errors, and the shard count from memory budgets.

Real Ray (the session's local one), real Parquet and FAISS; the builds use the benchmark stand-in
encoder (``stand-in:hashed-tokens``: the build's own embedding actors and files, no torch) and a Flat
index on a small JSON Lines corpus read in several pieces, so a test's builds take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import debug_config

from retro_platform.config import load_config
from retro_platform.db.build import Build
from retro_platform.db.build.documents import bucket_counts, map_piece, piece_file, staging_settings
from retro_platform.db.build.ledger import staging_folder
from retro_platform.db.build.sizing import BYTES_PER_TOKEN, derived_num_shards, shard_budgets
from retro_platform.db.build.tasks import TASK_RETRIES, run_tasks
from retro_platform.db.corpus import corpus_pieces
from retro_platform.db.embed import STAND_IN_ENCODER
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import validate_database
from retro_platform.errors import ConfigError

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
]


def write_corpus(path: Path, n_docs: int = 80) -> None:
    """A deterministic JSON Lines corpus of ``n_docs`` documents of ~40-140 words."""
    with path.open("w") as f:
        for i in range(n_docs):
            words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + (i * 13) % 100)]
            f.write(
                json.dumps({"id": f"doc-{i:03d}", "title": f"Doc {i}", "text": " ".join(words) + "."}) + "\n"
            )


def small_config(work: Path, corpus: Path, *overrides: str):
    """The debug preset over ``corpus`` in ~4 KB pieces, with the stand-in encoder and a Flat index."""
    return debug_config(
        work,
        f"database.corpus.source={corpus}",
        "database.corpus.max_documents=null",
        "database.corpus.piece_mb=0.004",
        "database.tokenizer.vocab_size=300",
        f"database.embed.model={STAND_IN_ENCODER}",
        "ray.include_dashboard=false",
        *overrides,
    )


def data_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_a_resume_after_a_failure_reads_no_current_piece_and_ends_byte_identical(ray_session, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    n_pieces = len(corpus_pieces(str(corpus), int(0.004 * 1024**2)))
    assert n_pieces >= 4

    clean = Build(small_config(tmp_path / "clean", corpus))
    expected = clean.run()
    assert clean.documents.parsed == list(range(n_pieces))

    # a build that fails after the corpus stage: its encoder folder is not there (a share not mounted)
    config = small_config(tmp_path / "work", corpus)
    layout = DatabaseLayout(config.db_path)
    staging = Path(staging_folder(layout))
    old_layout = staging / "pieces" / "train" / "bucket-0000" / "piece-000000.parquet"
    old_layout.parent.mkdir(parents=True)
    old_layout.write_bytes(b"a staged file of the earlier layout")
    missing = tmp_path / "encoder-not-mounted"
    with pytest.raises(ConfigError, match="encoder-not-mounted"):
        Build(small_config(tmp_path / "work", corpus, f"database.embed.model={missing}")).run()
    assert not (staging / "pieces").exists()  # the earlier layout is gone, the new staging is kept
    staged = sorted(p.name for p in (staging / "piece-files").iterdir())
    assert staged == [f"piece-{i:06d}.parquet" for i in range(n_pieces)]

    # the piece a lost node was writing: its staged file never appeared
    Path(piece_file(str(staging), 2)).unlink()
    resumed = Build(config)
    manifest = resumed.run()
    assert resumed.documents.parsed == [2]  # every other piece came from its staged file
    assert resumed.stats["pieces_parsed"] == 1
    assert manifest.files == expected.files and manifest.db_id == expected.db_id
    assert data_files(layout.root) == data_files(DatabaseLayout(clean.config.db_path).root)
    assert not staging.exists()  # removed once the build completed
    validate_database(config.db_path)


def test_a_staged_piece_is_current_while_its_source_and_settings_are(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 12)
    (piece,) = corpus_pieces(str(corpus))
    staging = str(tmp_path / "staging")
    buckets = {"train": 2, "valid": 1}
    settings = staging_settings(small_config(tmp_path, corpus), buckets)

    def stage(settings=settings):
        return map_piece(piece, staging, buckets, 0.1, False, settings=settings)

    first = stage()
    assert first["parsed"] and first["n_read"] == 12
    again = stage()
    assert not again["parsed"]
    assert {k: again[k] for k in first if k != "parsed"} == {k: v for k, v in first.items() if k != "parsed"}
    with corpus.open("a") as f:  # the file changed: its size and mtime moved
        f.write("\n")
    assert stage()["parsed"]
    assert not stage()["parsed"]
    other = staging_settings(small_config(tmp_path, corpus, "database.corpus.valid_fraction=0.2"), buckets)
    assert stage(other)["parsed"]  # a setting that moves documents between files


def test_a_transient_oserror_in_a_build_task_is_retried(ray_session, tmp_path):
    def flaky(counter: str, failures: int, error: str) -> int:
        path = Path(counter)
        attempt = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(attempt))
        if attempt <= failures:
            raise {"reset": ConnectionResetError, "value": ValueError}[error](f"attempt {attempt} failed")
        return attempt

    counter = tmp_path / "transient"
    assert run_tasks(
        "test.flaky", flaky, [{"counter": str(counter), "failures": 2, "error": "reset"}], None, 0.5
    ) == [3]

    counter = tmp_path / "persistent"
    with pytest.raises(ConnectionResetError, match=f"attempt {TASK_RETRIES + 1} failed"):
        run_tasks(
            "test.flaky", flaky, [{"counter": str(counter), "failures": 99, "error": "reset"}], None, 0.5
        )
    assert counter.read_text() == str(TASK_RETRIES + 1)

    counter = tmp_path / "bug"  # not an I/O error: not retried
    with pytest.raises(ValueError, match="attempt 1 failed"):
        run_tasks(
            "test.flaky", flaky, [{"counter": str(counter), "failures": 1, "error": "value"}], None, 0.5
        )
    assert counter.read_text() == "1"


def test_num_shards_null_picks_shards_from_the_build_memory_budget(tmp_path):
    assert load_config("debug", ["database.num_shards=null"]).database.num_shards is None
    for preset in ("gpu-125m", "wiki-full"):
        assert load_config(preset).database.num_shards is None
    assert load_config("debug").database.build_memory_gb == 4.0

    def config(build_gb: float, pool_gb: float = 64):
        return debug_config(
            tmp_path,
            "database.num_shards=null",
            f"database.build_memory_gb={build_gb}",
            f"pool.memory_gb_per_actor={pool_gb}",
        )

    # Flat (the debug preset): 1536 B of codes + 8 B of id hash per chunk in a build worker, 80% of the
    # budget over the 0.5 GB floor
    per_build_worker = int(0.8 * 0.5 * 1024**3 / (1536 + 8))
    assert shard_budgets(config(1), 10**6, 384)["build"] == per_build_worker
    chunk_bytes = 64 * BYTES_PER_TOKEN
    assert derived_num_shards(config(1), int(per_build_worker * chunk_bytes * 0.99), 384) == 1
    assert derived_num_shards(config(1), int(per_build_worker * chunk_bytes * 3.5), 384) == 4
    assert derived_num_shards(config(2), int(per_build_worker * chunk_bytes * 3.5), 384) == 2  # 3x the budget
    # the actor budget still applies when it is the smaller one
    assert derived_num_shards(config(64, pool_gb=1), int(per_build_worker * chunk_bytes * 3.5), 384) == 3

    # the build's own path: the corpus's size (a sparse 1.2 GB file: nothing is read) -> buckets
    corpus = tmp_path / "big.jsonl"
    with corpus.open("wb") as f:
        f.truncate(int(per_build_worker * chunk_bytes * 2.5))
    pieces = corpus_pieces(str(corpus), 64 << 20)
    assert bucket_counts(config(1), pieces) == {"train": 3, "valid": 1}
    assert bucket_counts(config(4), pieces) == {"train": 1, "valid": 1}


@pytest.mark.parametrize("value", ["0", "-1", "0.9", "lots", "null"])
def test_bad_build_memory_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match="database.build_memory_gb"):
        load_config("debug", [f"database.build_memory_gb={value}"])
