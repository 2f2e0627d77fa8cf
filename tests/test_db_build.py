"""Database build on real Ray, the real encoder, real FAISS and real Parquet."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import debug_config

from retro_platform.corpus import load_documents
from retro_platform.db.build import build_database
from retro_platform.db.embed import Embedder
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import validate_database
from retro_platform.errors import CorpusError, DatabaseError
from retro_platform.tokenizer import load_tokenizer_file


def all_chunks(layout: DatabaseLayout, manifest, split: str):
    tables = [pq.read_table(layout.chunks(split, s["shard"])) for s in manifest["splits"][split]]
    import pyarrow as pa

    return pa.concat_tables(tables).to_pylist()


def test_counts_ids_and_chunk_contents(debug_db):
    config, manifest = debug_db
    layout = DatabaseLayout(config.db_path)
    corpus = load_documents(config.database.corpus, use_ray=False)
    counts = manifest["counts"]
    assert counts["documents"] == {"train": len(corpus.train), "valid": len(corpus.valid)}
    assert counts["documents"]["train"] + counts["documents"]["valid"] == 300
    tokenizer = load_tokenizer_file(layout.tokenizer)
    m = manifest["chunk_len"]
    expected_chunk = 0
    for split, docs in (("train", corpus.train), ("valid", corpus.valid)):
        rows = all_chunks(layout, manifest, split)
        assert len(rows) == counts["chunks"][split]
        ids = [r["chunk_id"] for r in rows]
        assert ids == list(range(expected_chunk, expected_chunk + len(rows)))  # contiguous, global
        expected_chunk += len(rows)
        by_doc: dict[int, list[dict]] = {}
        for r in rows:
            assert len(r["tokens"]) == m and 1 <= r["n_tokens"] <= m
            assert all(t == manifest["tokenizer"]["pad_id"] for t in r["tokens"][r["n_tokens"] :])
            by_doc.setdefault(r["doc_id"], []).append(r)
        assert len(by_doc) == len(docs)
        for doc, (_, chunks) in zip(docs, sorted(by_doc.items()), strict=True):
            assert [c["position"] for c in chunks] == list(range(len(chunks)))
            assert {c["doc_key"] for c in chunks} == {doc["id"]}  # no chunk spans two documents
            assert all(c["n_tokens"] == m for c in chunks[:-1])  # only the last chunk is padded
            ids = [t for c in chunks for t in c["tokens"][: c["n_tokens"]]]
            assert tokenizer.decode(ids) == doc["text"]  # decoded chunks give back the document
    assert 0 < counts["padding_fraction"] < 0.5


def test_embeddings_equal_encoder_output_and_chunks_find_themselves(debug_db):
    config, manifest = debug_db
    layout = DatabaseLayout(config.db_path)
    shard = manifest["index"]["shards"][1]
    rows = pq.read_table(layout.chunks("train", shard["split_shard"])).to_pylist()
    stored = np.load(layout.embeddings("train", shard["split_shard"]))
    sample = list(range(0, len(rows), max(1, len(rows) // 16)))
    embed = config.database.embed
    direct = Embedder(embed.model, embed.compute_dtype, out_dtype="float32").encode(
        [rows[i]["text"] for i in sample]
    )
    cos = np.sum(direct * stored[sample].astype(np.float32), axis=1)
    # bf16 encoder weights: results move slightly with the padding of the batch a text lands in
    tolerance = 0.99 if embed.compute_dtype != "float32" else 0.999
    assert cos.min() > tolerance, cos.min()
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=2e-3)
    index = faiss.read_index(str(layout.index(shard["shard"])))
    assert index.ntotal == len(rows)
    _, found = index.search(stored.astype(np.float32), 1)
    duplicates = {i for i, r in enumerate(rows) if sum(x["text"] == r["text"] for x in rows) > 1}
    own = [found[i, 0] == i for i in range(len(rows)) if i not in duplicates]
    assert np.mean(own) == 1.0
    tokens = np.load(layout.shard_tokens(shard["shard"]), mmap_mode="r")
    assert tokens.shape == (len(rows), manifest["chunk_len"]) and tokens.dtype == np.int32
    assert tokens[5].tolist() == rows[5]["tokens"]


def test_validate_refuses_mismatch_and_corruption(debug_db, tmp_path):
    config, manifest = debug_db
    validate_database(config.db_path, expect={"chunk_len": 64, "encoder": "all-MiniLM-L6-v2"})
    with pytest.raises(DatabaseError, match="chunk_len=64"):
        validate_database(config.db_path, expect={"chunk_len": 32}, check_files=False)
    copy = tmp_path / "db"
    shutil.copytree(config.db_path, copy)
    target = copy / "index" / "shard-0001.faiss"
    target.write_bytes(target.read_bytes()[:100])  # truncated index shard
    with pytest.raises(DatabaseError, match="shard-0001.faiss"):
        validate_database(copy)
    with pytest.raises(DatabaseError, match="does not exist"):
        validate_database(tmp_path / "nothing")


def test_rerun_is_a_no_op_and_one_deleted_shard_is_rebuilt_alone(debug_db, tmp_path):
    config, manifest = debug_db
    work = tmp_path / "work"
    shutil.copytree(config.db_path, work / "db")
    copy_config = debug_config(work)
    again = build_database(copy_config)
    assert again["files"] == manifest["files"]  # same checksums: nothing changed
    layout = DatabaseLayout(copy_config.db_path)
    before = {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()}
    layout.embeddings("train", 1).unlink()
    layout.index(1).unlink()
    rebuilt = build_database(copy_config)
    changed = sorted(layout.relative(p) for p in before if p.exists() and p.stat().st_mtime_ns != before[p])
    assert set(changed) <= {
        "embeddings/train/shard-0001.npy",
        "index/shard-0001.faiss",
        "index/shard-0001.tokens.npy",
        "index/shard-0001.doc_ids.npy",
        "manifest.json",
    }, changed
    assert layout.index(1).exists() and rebuilt["counts"] == manifest["counts"]
    validate_database(copy_config.db_path)


def test_mlflow_run_records_the_build(debug_db):
    import mlflow

    config, manifest = debug_db
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'build-db'")
    assert runs
    run = runs[-1]
    assert run.data.params["database.chunk_len"] == "64"
    assert run.data.metrics["chunks.train"] == manifest["counts"]["chunks"]["train"]
    assert run.data.metrics["chunks_per_second_embedding"] > 0
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


BAD_INPUTS = [
    ("malformed.jsonl", b'{"id": "a", "text": "fine"}\n{"id": "b", "text": \n', "line 2: malformed JSON"),
    ("dupes.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate document id 'a'"),
    ("latin1.jsonl", b'{"id": "a", "text": "caf\xe9"}\n', "line 1: not valid UTF-8"),
    ("empty.jsonl", b'{"id": "a", "text": ""}\n{"id": "b", "text": "   "}\n', "no non-empty documents"),
    ("noid.jsonl", b'{"text": "no id here"}\n', "line 1: missing 'id'"),
    ("number.jsonl", b'{"id": "a", "text": 42}\n', "'text' of document 'a' must be a string"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_corpus_is_refused_without_writing_a_database(ray_session, tmp_path, name, content, message):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    config = debug_config(tmp_path / "work", f"database.corpus.source={corpus}")
    with pytest.raises(CorpusError, match=message) as info:
        build_database(config)
    assert str(corpus) in str(info.value) or "duplicate" in message or "non-empty" in message
    assert not config.db_path.exists()


def test_corpus_formats_folder_and_parquet(tmp_path):
    import pyarrow as pa

    from retro_platform.config import CorpusConfig

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Alpha document.")
    (folder / "sub" / "b.md").write_text("# Beta\nSecond document.")
    (folder / "ignored.bin").write_bytes(b"\x00")
    corpus = load_documents(CorpusConfig(source=str(folder), valid_fraction=0.0), use_ray=False)
    assert sorted(d["id"] for d in corpus.train) == ["a.txt", "sub/b.md"]
    table = pa.table({"id": ["x", "y", "z"], "text": ["one", "", "three"]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    corpus = load_documents(CorpusConfig(source=str(path), valid_fraction=0.0), use_ray=False)
    assert [d["id"] for d in corpus.train] == ["x", "z"] and corpus.empty == 1
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), bad)
    with pytest.raises(CorpusError, match="lacks column"):
        load_documents(CorpusConfig(source=str(bad)), use_ray=False)


def test_split_is_stable_and_near_the_fraction():
    from retro_platform.corpus import stable_split

    ids = [f"doc-{i}" for i in range(5000)]
    first = [stable_split(i, 0.1) for i in ids]
    assert first == [stable_split(i, 0.1) for i in ids]
    assert 0.08 < first.count("valid") / len(ids) < 0.12


def test_index_choice_and_too_few_training_vectors():
    from retro_platform.db.index import choose_factory, train_index

    assert choose_factory(10_000, 384) == "Flat"
    assert choose_factory(500_000, 384) == "HNSW32"
    assert choose_factory(500_000, 384, memory_budget_gb=0.1).startswith("IVF")
    assert choose_factory(50_000_000, 384).startswith("IVF")
    with pytest.raises(DatabaseError, match="needs at least 1024 training vectors"):
        train_index("IVF1024,Flat", np.random.rand(100, 16).astype(np.float32))
    with pytest.raises(DatabaseError, match="not a valid FAISS factory"):
        train_index("NotAnIndex", np.random.rand(100, 16).astype(np.float32))


def test_manifest_is_json_with_checksums(debug_db):
    config, manifest = debug_db
    on_disk = json.loads(DatabaseLayout(config.db_path).manifest.read_text())
    assert on_disk["db_id"] == manifest["db_id"]
    assert len(on_disk["files"]) >= 12 and all(len(v) == 64 for v in on_disk["files"].values())
