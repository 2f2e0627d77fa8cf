"""NeighborPool on real Ray actors over the real debug database (real FAISS)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import debug_config

from retro_platform.commands.build_db import build_database
from retro_platform.db.layout import DatabaseLayout
from retro_platform.neighbors.pool import NeighborPool


def train_vectors(config, manifest):
    layout = DatabaseLayout(config.db_path)
    vectors = [
        np.load(layout.embeddings("train", s.shard)).astype(np.float32) for s in manifest.splits["train"]
    ]
    doc_ids = [np.load(layout.shard_doc_ids(s.shard)) for s in manifest.index.shards]
    tokens = [np.load(layout.shard_tokens(s.shard)) for s in manifest.index.shards]
    return np.concatenate(vectors), np.concatenate(doc_ids), np.concatenate(tokens)


def valid_queries(config, manifest, n=24):
    layout = DatabaseLayout(config.db_path)
    return np.load(layout.embeddings("valid", 0))[:n].astype(np.float32)


@pytest.fixture(scope="module")
def pool(debug_db):
    config, manifest = debug_db
    pool = NeighborPool.start(config, manifest)
    yield pool
    pool.shutdown()


def test_exact_index_equals_brute_force(pool, debug_db):
    config, manifest = debug_db
    vectors, _, _ = train_vectors(config, manifest)
    queries = valid_queries(config, manifest)
    result = pool.search(queries, k=4)
    brute = queries @ vectors.T  # (q, n) inner products; chunk id = row (train ids start at 0)
    expected = np.sort(brute, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.take_along_axis(brute, result.chunk_ids, axis=1), result.scores, rtol=1e-4, atol=1e-5
    )
    assert result.tokens.shape == (len(queries), 4, 2 * manifest.chunk_len)


def test_exclusion_never_returns_excluded_documents_and_still_returns_k(pool, debug_db):
    config, manifest = debug_db
    queries = valid_queries(config, manifest)
    first = pool.search(queries, k=4)
    exclude = [np.unique(first.doc_ids[i]) for i in range(len(queries))]  # every doc of the top-4
    second = pool.search(queries, exclude_doc_ids=exclude, k=4)
    for i in range(len(queries)):
        assert not np.isin(second.doc_ids[i], exclude[i]).any()
    assert (second.chunk_ids >= 0).all()  # k results still come back
    assert (second.scores <= first.scores[:, :1] + 1e-6).all()


def test_continuation_is_next_chunk_of_same_document_or_padding(pool, debug_db):
    config, manifest = debug_db
    _, doc_ids, tokens = train_vectors(config, manifest)
    m = manifest.chunk_len
    pad = manifest.tokenizer.pad_id
    result = pool.search(valid_queries(config, manifest, 40), k=4)
    saw_end = saw_next = False
    for q, c, got in zip(
        *np.nonzero(result.chunk_ids >= 0), result.tokens[result.chunk_ids >= 0], strict=True
    ):
        chunk = result.chunk_ids[q, c]
        assert got[:m].tolist() == tokens[chunk].tolist()
        if chunk + 1 < len(doc_ids) and doc_ids[chunk + 1] == doc_ids[chunk]:
            assert got[m:].tolist() == tokens[chunk + 1].tolist()
            saw_next = True
        else:
            assert (got[m:] == pad).all()
            saw_end = True
    assert saw_next and saw_end


def test_killed_shard_actor_is_restarted_and_queries_still_answer(pool, debug_db):
    import ray

    config, manifest = debug_db
    queries = valid_queries(config, manifest)
    expected = pool.search(queries, k=2)
    results, errors = [], []

    def client():
        try:
            for _ in range(15):
                results.append(pool.search(queries, k=2))
        except Exception as exc:  # recorded and asserted below
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    old_pid = ray.get(pool.replicas[1][0].info.remote())["pid"]
    ray.kill(pool.replicas[1][0], no_restart=False)
    thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == 15
    for r in results:
        np.testing.assert_array_equal(r.chunk_ids, expected.chunk_ids)
        np.testing.assert_array_equal(r.tokens, expected.tokens)
    assert ray.get(pool.replicas[1][0].info.remote())["pid"] != old_pid  # a new process serves the shard


def recall_at(found: np.ndarray, true: np.ndarray) -> float:
    """Fraction of the true top-k ids [q, k] that ``found`` [q, k] returned."""
    return float(np.mean([len(np.intersect1d(f, t)) / t.shape[0] for f, t in zip(found, true, strict=True)]))


def test_approximate_index_reports_recall_and_is_exact_when_it_searches_every_list(
    ray_session, tmp_path_factory
):
    """IVF16,Flat served by the pool: recall@4 against brute force grows with nprobe, and reaches the
    exact answer when every list is searched (nprobe = 16). A pool never attaches to actors started
    with other search parameters."""
    work = tmp_path_factory.mktemp("ivf-work")
    config = debug_config(work, "database.index.factory=IVF16,Flat")
    manifest = build_database(config)
    assert manifest.index.factory == "IVF16,Flat"
    vectors, _, _ = train_vectors(config, manifest)
    queries = valid_queries(config, manifest, 48)
    brute = queries @ vectors.T
    true = np.argsort(-brute, axis=1)[:, :4]
    recalls, scores = {}, {}
    for nprobe in (1, 4, 16):
        pool = NeighborPool.start(
            debug_config(work, "database.index.factory=IVF16,Flat", f"database.index.nprobe={nprobe}"),
            manifest,
        )
        try:
            result = pool.search(queries, k=4)
        finally:
            pool.shutdown()
        # IVF,Flat scores are exact inner products of whatever it returns
        np.testing.assert_allclose(
            np.take_along_axis(brute, result.chunk_ids, axis=1), result.scores, rtol=1e-4, atol=1e-5
        )
        recalls[nprobe] = recall_at(result.chunk_ids, true)
        scores[nprobe] = result.scores
    print(f"IVF16,Flat recall@4 by nprobe: {recalls}")
    assert recalls[1] <= recalls[4] <= recalls[16] >= 0.99
    # searching every list is exact: the top-4 scores are brute force's (a near-tie, equal to float
    # rounding, may order two chunk ids differently, so ids are not compared here)
    np.testing.assert_allclose(scores[16], np.take_along_axis(brute, true, axis=1), rtol=0, atol=1e-5)
    assert recalls[1] < 1.0  # one list of 16 misses neighbours: the index really is approximate


def test_memory_mapped_shards_answer_exactly_as_loaded_ones(pool, debug_db):
    config, manifest = debug_db
    mapped_config = debug_config(config.work_dir, "pool.mmap_index=true")
    mapped = NeighborPool.start(mapped_config, manifest)
    try:
        queries = valid_queries(config, manifest)
        expected, got = pool.search(queries, k=4), mapped.search(queries, k=4)
        np.testing.assert_array_equal(got.chunk_ids, expected.chunk_ids)
        np.testing.assert_array_equal(got.scores, expected.scores)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
    finally:
        mapped.shutdown()


def test_shard_count_follows_the_corpus_size_and_the_actor_memory_budget(tmp_path):
    from retro_platform.db.build.sizing import BYTES_PER_TOKEN, derived_num_shards

    small = debug_config(tmp_path, "database.num_shards=null", "pool.memory_gb_per_actor=1")
    large = debug_config(tmp_path, "database.num_shards=null", "pool.memory_gb_per_actor=4")
    chunk_bytes = small.database.chunk_len * BYTES_PER_TOKEN  # corpus bytes per chunk, as estimated
    assert derived_num_shards(small, int(1000 * chunk_bytes), 384) == 1
    # Flat index (the debug preset): 1536 B of codes + 256 B tokens + 8 B doc id per chunk, 80% of 1 GiB
    per_actor = int(0.8 * 1024**3 / (1536 + 256 + 8))
    assert derived_num_shards(small, int(per_actor * chunk_bytes * 0.99), 384) == 1
    assert derived_num_shards(small, int(per_actor * chunk_bytes * 10.5), 384) == 11
    assert derived_num_shards(large, int(per_actor * chunk_bytes * 10.5), 384) == 3  # 4x the budget
