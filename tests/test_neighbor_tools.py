"""query-neighbors (precomputed table), add-docs (live update), neighbors (inspection) on real Ray/FAISS."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import debug_config

from retro_platform.commands.neighbors import find_neighbors, show_neighbors
from retro_platform.commands.query_neighbors import precompute_neighbors
from retro_platform.db.add_docs import add_documents
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.neighbors.pool import NeighborPool


def copy_db(debug_db, tmp_path):
    config, _ = debug_db
    work = tmp_path / "work"
    shutil.copytree(config.db_path, work / "db")
    return debug_config(work)


def test_precomputed_table_matches_pool_and_excludes_own_document(debug_db, tmp_path):
    config = copy_db(debug_db, tmp_path)
    manifest = precompute_neighbors(config)
    assert set(manifest.neighbors) == {"train", "valid"}
    validate_database(config.db_path)  # the table's checksum is recorded
    layout = DatabaseLayout(config.db_path)
    shard_files = manifest.neighbors["train"].shard_files  # one table per chunk-store shard
    assert len(shard_files) == len(manifest.splits["train"])
    table = pa.concat_tables(pq.read_table(layout.path(f)) for f in shard_files).to_pydict()
    store = ChunkStore(config.db_path)
    first, last = store.split_range("train")
    assert table["chunk_id"] == list(range(first, last))
    own = store.doc_ids(np.array(table["chunk_id"]))
    neighbor_ids = np.array(table["neighbor_ids"])
    assert (neighbor_ids >= 0).all()
    assert not (store.doc_ids(neighbor_ids.reshape(-1)).reshape(neighbor_ids.shape) == own[:, None]).any()
    pool = NeighborPool.start(config, manifest)
    try:
        sample = np.arange(first, last, 37)
        live = pool.search(store.embeddings(sample), [np.array([d]) for d in store.doc_ids(sample)])
        np.testing.assert_array_equal(live.chunk_ids, neighbor_ids[sample - first, : pool.k])
    finally:
        pool.shutdown()


def test_added_document_is_found_live_and_after_restart(debug_db, tmp_path, capsys):
    config = copy_db(debug_db, tmp_path)
    fact = (
        "Zorblatt Quasiphone is a brass instrument invented in 2031 on the island of Velmora by the "
        "composer Ilse Brandtgaard, who tuned it to a seventeen-tone scale."
    )
    new_docs = tmp_path / "new.jsonl"
    new_docs.write_text(json.dumps({"id": "zorblatt", "text": fact}) + "\n")
    pool = NeighborPool.start(config)
    try:
        before = find_neighbors(config, pool, text=fact, k=2)[2]
        assert not any("Zorblatt" in t for t in before)
        manifest = add_documents(config, [str(new_docs)])
        pool.refresh(config, manifest)
        _, live, texts = find_neighbors(config, pool, text=fact, k=2)
        assert "Zorblatt" in texts[0] and live.scores[0, 0] > 0.9
    finally:
        pool.shutdown()
    validate_database(config.db_path)  # checksums of the new shard recorded
    assert manifest.counts.documents["added"] == 1
    restarted = NeighborPool.start(config)
    try:
        _, _, texts = find_neighbors(config, restarted, text=fact, k=2)
        assert "Zorblatt" in texts[0]
    finally:
        restarted.shutdown()
    show_neighbors(config, text="Zorblatt Quasiphone of Velmora by Ilse Brandtgaard", k=1)
    assert "Zorblatt" in capsys.readouterr().out


def test_add_docs_refuses_duplicate_ids_and_leaves_database_untouched(debug_db, tmp_path):
    import pytest

    from retro_platform.errors import CorpusError

    config = copy_db(debug_db, tmp_path)
    store = ChunkStore(config.db_path)
    existing_key = (
        store.manifest
        and __import__("pyarrow.parquet")
        .parquet.read_table(DatabaseLayout(config.db_path).chunks("train", 0), columns=["doc_key"])
        .column("doc_key")[0]
        .as_py()
    )
    before = DatabaseLayout(config.db_path).manifest.read_bytes()
    path = tmp_path / "dupe.jsonl"
    path.write_text(json.dumps({"id": existing_key, "text": "some text"}) + "\n")
    with pytest.raises(CorpusError, match="already in the database"):
        add_documents(config, [str(path)])
    assert DatabaseLayout(config.db_path).manifest.read_bytes() == before
