"""Database build on real Ray, the real encoder, real FAISS and real Parquet.

Most tests read the session's debug database (``debug_db``: 300 real Wikipedia summaries, 2 train
shards + 1 valid shard, Flat). Tests that re-run or damage a build work on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import debug_config

from retro_platform.commands.build_db import build_database
from retro_platform.db.corpus import load_documents
from retro_platform.db.embed import Embedder
from retro_platform.db.index import choose_factory, train_index, train_sample_size
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import load_manifest, validate_database
from retro_platform.db.tokenizer import load_tokenizer
from retro_platform.errors import DatabaseError


def split_rows(layout: DatabaseLayout, manifest, split: str) -> list[dict]:
    tables = [pq.read_table(layout.chunks(split, s.shard)) for s in manifest.splits[split]]
    return pa.concat_tables(tables).to_pylist()


def mtimes(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def copy_db(debug_db, tmp_path):
    """A config whose database is a copy of the session's debug database."""
    config, _ = debug_db
    work = tmp_path / "work"
    shutil.copytree(config.db_path, work / "db")
    return debug_config(work)


def test_counts_ids_and_chunk_contents(debug_db):
    config, manifest = debug_db
    layout = DatabaseLayout(config.db_path)
    corpus = load_documents(config.database.corpus, use_ray=False)
    counts = manifest.counts
    assert counts.documents == {"train": len(corpus.train), "valid": len(corpus.valid)}
    assert counts.documents["train"] + counts.documents["valid"] == 300
    assert len(manifest.splits["train"]) == 2 and len(manifest.index.shards) == 2
    tokenizer = load_tokenizer(config.db_path)
    m, pad = manifest.chunk_len, manifest.tokenizer.pad_id
    next_chunk = next_doc = 0
    for split, docs in (("train", corpus.train), ("valid", corpus.valid)):
        rows = split_rows(layout, manifest, split)
        assert len(rows) == counts.chunks[split]
        assert [r["chunk_id"] for r in rows] == list(range(next_chunk, next_chunk + len(rows)))
        next_chunk += len(rows)
        by_doc: dict[int, list[dict]] = {}
        for r in rows:
            assert len(r["tokens"]) == m and 1 <= r["n_tokens"] <= m
            assert all(t == pad for t in r["tokens"][r["n_tokens"] :])  # padded and marked by n_tokens
            by_doc.setdefault(r["doc_id"], []).append(r)
        assert sorted(by_doc) == list(range(next_doc, next_doc + len(docs)))  # doc ids contiguous
        next_doc += len(docs)
        texts = {doc["id"]: doc["text"] for doc in docs}
        assert sorted(chunks[0]["doc_key"] for chunks in by_doc.values()) == sorted(texts)  # each once
        for _, chunks in sorted(by_doc.items()):
            assert [c["position"] for c in chunks] == list(range(len(chunks)))
            (key,) = {c["doc_key"] for c in chunks}  # no chunk spans two documents
            doc = {"id": key, "text": texts[key]}
            assert all(c["n_tokens"] == m for c in chunks[:-1])  # only a document's last chunk is padded
            ids = [t for c in chunks for t in c["tokens"][: c["n_tokens"]]]
            assert ids[-1] == manifest.tokenizer.eod_id
            assert tokenizer.decode(ids[:-1]) == doc["text"]  # the chunks give back the document
            assert tokenizer.decode(chunks[0]["tokens"][: chunks[0]["n_tokens"]]) == chunks[0]["text"]
    # within a shard, documents keep their corpus order
    order = {doc["id"]: i for i, doc in enumerate(corpus.train)}
    for s in manifest.splits["train"]:
        keys = pq.read_table(layout.chunks("train", s.shard), columns=["doc_key", "position"]).to_pylist()
        firsts = [order[r["doc_key"]] for r in keys if r["position"] == 0]
        assert firsts == sorted(firsts)
    # shards are contiguous ranges of documents and chunks
    for split in ("train", "valid"):
        shards = manifest.splits[split]
        for a, b in zip(shards, shards[1:], strict=False):
            assert a.doc_end == b.doc_start and a.chunk_end == b.chunk_start
    assert 0 < counts.padding_fraction < 0.5 and counts.documents_empty == 0


def test_embeddings_are_the_encoders_output_and_chunks_find_themselves(debug_db):
    config, manifest = debug_db
    layout = DatabaseLayout(config.db_path)
    shard = manifest.index.shards[1]
    path = layout.chunks("train", shard.split_shard)
    stored = np.load(layout.embeddings("train", shard.split_shard))
    assert stored.dtype == np.float16 and stored.shape[1] == manifest.encoder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # the build embeds one Parquet row group per encode call: the same call here gives the same bytes
    embedder = Embedder.from_manifest(manifest)
    texts = pq.ParquetFile(path).read_row_group(0, columns=["text"]).column("text").to_pylist()
    assert np.array_equal(embedder.encode(texts), stored[: len(texts)])
    # and any other batching agrees to bf16 precision
    loose = Embedder.from_manifest(manifest, out_dtype="float32").encode(texts[:7])
    assert np.sum(loose * stored[:7].astype(np.float32), axis=1).min() > 0.99

    rows = pq.read_table(path, columns=["text", "tokens"]).to_pylist()
    index = faiss.read_index(str(layout.index(shard.shard)))
    assert index.ntotal == len(rows) == shard.n_vectors
    _, found = index.search(stored.astype(np.float32), 1)
    texts = [r["text"] for r in rows]
    unique = [i for i, t in enumerate(texts) if texts.count(t) == 1]
    assert all(found[i, 0] == i for i in unique)  # every chunk is its own nearest neighbour
    tokens = np.load(layout.shard_tokens(shard.shard), mmap_mode="r")
    assert tokens.shape == (len(rows), manifest.chunk_len) and tokens.dtype == np.int32
    assert tokens[5].tolist() == rows[5]["tokens"]
    doc_ids = np.load(layout.shard_doc_ids(shard.shard))
    assert doc_ids[0] == shard.doc_start and doc_ids[-1] == shard.doc_end - 1


def test_manifest_records_what_later_stages_need(debug_db):
    config, manifest = debug_db
    on_disk = load_manifest(config.db_path)
    assert on_disk.to_dict() == json.loads(json.dumps(manifest.to_dict()))
    assert on_disk.status == "complete" and len(on_disk.db_id) == 16
    assert on_disk.encoder.name == "all-MiniLM-L6-v2" and on_disk.index.factory == "Flat"
    assert on_disk.config["chunk_len"] == 64
    files = on_disk.files
    assert (
        "tokenizer.json" in files
        and "index/shard-0001.faiss" in files
        and "chunks/valid/shard-0000.parquet" in files
    )
    assert all(len(v) == 64 for v in files.values())
    assert "index/shard-0002.faiss" not in files  # the valid split is embedded but not indexed
    assert "embeddings/valid/shard-0000.npy" in files
    validate_database(config.db_path, expect={"chunk_len": 64, "encoder": "all-MiniLM-L6-v2", "dim": 384})


def test_validate_refuses_mismatch_corruption_and_partial_builds(debug_db, tmp_path):
    config, manifest = debug_db
    with pytest.raises(DatabaseError, match="chunk_len=64 but 32 is expected"):
        validate_database(config.db_path, expect={"chunk_len": 32}, check_files=False)
    with pytest.raises(DatabaseError, match="tokenizer_sha256"):
        validate_database(config.db_path, expect={"tokenizer_sha256": "0" * 64}, check_files=False)
    with pytest.raises(ValueError, match="unknown expectation"):
        validate_database(config.db_path, expect={"chunk_length": 64})
    copy = tmp_path / "db"
    shutil.copytree(config.db_path, copy)
    target = copy / "index" / "shard-0001.faiss"
    target.write_bytes(target.read_bytes()[:100])  # truncated index shard
    with pytest.raises(DatabaseError, match=r"index/shard-0001\.faiss does not match its checksum"):
        validate_database(copy)
    (copy / "chunks" / "train" / "shard-0000.parquet").unlink()
    with pytest.raises(DatabaseError, match=r"chunks/train/shard-0000\.parquet is missing"):
        validate_database(copy)
    data = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**data, "status": "building"}))
    with pytest.raises(DatabaseError, match="only partly built"):
        validate_database(copy)
    (copy / "manifest.json").write_text('{"format_version": 1, "sta')
    with pytest.raises(DatabaseError, match=r"manifest\.json is corrupt"):
        validate_database(copy)
    with pytest.raises(DatabaseError, match="does not exist"):
        validate_database(tmp_path / "nothing")


def test_rerun_changes_nothing_and_a_deleted_shard_is_rebuilt_alone(debug_db, tmp_path):
    _, manifest = debug_db
    config = copy_db(debug_db, tmp_path)
    layout = DatabaseLayout(config.db_path)
    before = mtimes(layout.root)
    again = build_database(config)
    assert again == manifest  # same checksums, same db id
    assert mtimes(layout.root) == before  # not one file rewritten, the manifest included

    layout.embeddings("train", 1).unlink()
    layout.index(1).unlink()
    rebuilt = build_database(config)
    changed = sorted(layout.relative(p) for p in before if p.stat().st_mtime_ns != before[p])
    assert changed == [
        "embeddings/train/shard-0001.npy",
        "index/shard-0001.doc_ids.npy",
        "index/shard-0001.faiss",
        "index/shard-0001.tokens.npy",
        "manifest.json",
    ]
    assert rebuilt == manifest  # byte-identical to the original build
    validate_database(config.db_path)


def test_interrupted_build_resumes_to_the_same_bytes(debug_db, tmp_path):
    """A build stopped mid-way (partial manifest, missing outputs, a stray temporary) completes to the
    same files as an uninterrupted build."""
    _, manifest = debug_db
    config = copy_db(debug_db, tmp_path)
    layout = DatabaseLayout(config.db_path)
    partial = {k: v for k, v in manifest.to_dict().items() if k not in ("splits", "index", "counts", "db_id")}
    partial["status"] = "building"
    kept = ["tokenizer.json", "chunks/train/shard-0000.parquet", "chunks/train/shard-0001.parquet"]
    partial["files"] = {k: manifest.files[k] for k in kept}
    partial["inputs"] = {k: manifest.inputs[k] for k in kept}
    for relative in manifest.files:
        if relative not in kept and not relative.startswith("embeddings/train/shard-0000"):
            (layout.root / relative).unlink()  # that one stays on disk but unrecorded: rewritten
    layout.manifest.write_text(json.dumps(partial))
    (layout.root / "index").mkdir(exist_ok=True)
    (layout.root / "index" / ".shard-0000.faiss.tmp").write_bytes(b"half a file")
    with pytest.raises(DatabaseError, match="only partly built"):
        validate_database(config.db_path)
    resumed = build_database(config)
    assert resumed == manifest
    assert not list(layout.root.rglob("*.tmp"))
    validate_database(config.db_path)


def test_changed_settings_or_foreign_folder_are_refused(debug_db, tmp_path):
    config = copy_db(debug_db, tmp_path)
    other = debug_config(config.work_dir, "database.tokenizer.vocab_size=2048")
    with pytest.raises(DatabaseError, match=r"different settings \(changed: tokenizer\.vocab_size\)"):
        build_database(other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatabaseError, match="is not a database"):
        build_database(debug_config(tmp_path, f"database.path={foreign}"))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_mlflow_run_records_the_build(debug_db):
    import mlflow

    config, manifest = debug_db
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'build-db'", order_by=["start_time ASC"]
    )
    run = runs[0]  # the session fixture's build
    assert run.data.params["database.chunk_len"] == "64"
    assert run.data.tags["db_id"] == manifest.db_id
    metrics = run.data.metrics
    assert metrics["chunks.train"] == manifest.counts.chunks["train"]
    for stage in ("corpus", "chunking", "embedding", "index"):
        assert next(v for k, v in metrics.items() if k.endswith(f"per_second_{stage}")) > 0
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_auto_index_rule():
    assert choose_factory(10_000, 384) == "Flat"
    assert choose_factory(99_999, 384) == "Flat"
    assert choose_factory(500_000, 384) == "HNSW32"
    assert choose_factory(10_000, 384, memory_budget_gb=0.001).startswith("IVF")
    assert choose_factory(500_000, 384, memory_budget_gb=0.1).startswith("IVF")
    # 4 * sqrt(n) lists searched through an HNSW graph, dim / 8 code bytes, fp16 copies re-rank (issue 15)
    assert choose_factory(50_000_000, 384) == "IVF32768,PQ96x4fs,Refine(SQfp16)"
    # the sample no longer caps the lists: train_sample_size raises it to 39 per list
    assert choose_factory(50_000_000, 384, train_sample=100_000) == "IVF32768,PQ96x4fs,Refine(SQfp16)"
    assert train_sample_size("IVF32768,PQ96x4fs,Refine(SQfp16)", 50_000_000, 100_000) == 39 * 32768
    with pytest.raises(DatabaseError, match="needs at least 1024 training vectors"):
        train_index("IVF1024,Flat", np.random.rand(100, 16).astype(np.float32))


def test_added_documents_survive_a_rebuild(debug_db, tmp_path):
    from retro_platform.db.add_docs import add_documents

    config = copy_db(debug_db, tmp_path)
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"id": "new-doc", "text": "Ray actors hold the shards of a retrieval index."}\n')
    added = add_documents(config, [str(extra)])
    assert added.counts.documents["added"] == 1
    again = build_database(config)
    assert again.splits["added"] == added.splits["added"]
    assert again.index.shards == added.index.shards
    validate_database(config.db_path)
    layout = DatabaseLayout(config.db_path)
    layout.chunks("added", 0).write_bytes(b"corrupt")
    with pytest.raises(
        DatabaseError, match=r"chunks/added/shard-0000\.parquet \(added by `retro add-docs`\)"
    ):
        build_database(config)


def test_build_db_command_prints_its_stages_and_nothing_that_reads_as_a_failure(tmp_path):
    """`retro build-db` as a newcomer runs it: the build's stage lines, no dependency noise.

    Before quiet output, every build printed faiss's loader probes (``ModuleNotFoundError(...)``),
    Ray's ``core_worker.cc`` constructor-argument line and Ray Data's progress blocks (``-v`` still does).
    """
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, as on a newcomer's machine
    env.pop("RETRO_VERBOSE", None)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("retro")), "build-db", "--config", "debug"]
        + ["--set", f"work_dir={tmp_path / 'work'}", "--set", "ray.include_dashboard=false"]
        + ["--set", "database.corpus.max_documents=60"],  # every stage, on a fifth of the documents
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
    )
    output = result.stdout
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if "Error" in line or "Traceback" in line], output
    assert "has constructor arguments in the object store" not in output, output
    for stage in (
        "build.documents: corpus wikipedia: ",
        "build.pipeline: tokenizer: ",
        "build.pipeline: chunks: wrote ",
        "build.embeddings: embeddings: ",
        "build.indexing: index: Flat over ",
        "build.pipeline: database ",
    ):
        assert f"retro_platform.db.{stage}" in output, output
    assert "retro_platform.commands.build_db: MLflow run " in output, output
