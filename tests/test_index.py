"""The auto index rule (lists grow with the data, enough training vectors per list, buildable factory
strings) and IVF-PQ + refine answering exactly when its short list covers the index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retro_platform.db.index import (
    DEFAULT_K_FACTOR,
    MAX_LISTS,
    MIN_TRAIN_PER_LIST,
    MMAP_READ_FLAGS,
    QUANTIZER_ADD_EF_SEARCH,
    choose_factory,
    fill_index,
    ivf_lists,
    set_search_params,
    train_index,
    train_sample_size,
)


def clustered(n: int, dim: int, seed: int, centers: int = 50) -> np.ndarray:
    """Unit vectors around a few random directions, rounded to fp16 as the build stores embeddings."""
    rng = np.random.default_rng(seed)
    middle = np.random.default_rng(1234).standard_normal((centers, dim), dtype=np.float32)
    x = middle[rng.integers(0, centers, n)] / np.sqrt(dim)
    x += rng.standard_normal((n, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def exact(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)


@pytest.mark.parametrize("quantizer", ["IVF32", "IVF32_HNSW32"])
def test_ivf_pq_refine_is_exact_when_the_short_list_covers_the_index(tmp_path, quantizer):
    dim, n, k = 64, 4000, 4
    base, queries = clustered(n, dim, 0), clustered(50, dim, 1)
    factory = f"{quantizer},PQ16x4fs,Refine(SQfp16)"
    trained = train_index(factory, base[:2000])
    if quantizer.endswith("HNSW32"):  # vectors go to the lists a deep graph search finds
        quantizer_index = faiss.extract_index_ivf(trained).quantizer
        assert faiss.downcast_index(quantizer_index).hnsw.efSearch == QUANTIZER_ADD_EF_SEARCH
    index = fill_index(trained, base, block=1000)
    assert index.ntotal == n and faiss.downcast_index(index).k_factor == DEFAULT_K_FACTOR
    path = str(tmp_path / "shard.faiss")
    faiss.write_index(index, path)
    true_scores, true_ids = exact(base, queries, k)
    for served in (
        index,
        faiss.read_index(path, MMAP_READ_FLAGS),
        faiss.read_index(path, faiss.IO_FLAG_MMAP),
    ):
        assert faiss.downcast_index(served).k_factor == DEFAULT_K_FACTOR  # saved with the index
        set_search_params(served, nprobe=32, ef_search=16, k_factor=n // k)  # every list, every vector
        scores, ids = served.search(queries, k)
        np.testing.assert_array_equal(ids, true_ids)
        np.testing.assert_allclose(scores, true_scores, atol=1e-5)  # fp16 copies of fp16 data: exact
    # the shard actors' three-argument call keeps the saved k_factor
    served = faiss.read_index(path, MMAP_READ_FLAGS)
    set_search_params(served, 32, 16)
    ivf = faiss.extract_index_ivf(served)
    assert ivf.nprobe == 32 and faiss.downcast_index(served).k_factor == DEFAULT_K_FACTOR
    if quantizer.endswith("HNSW32"):
        assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 64  # >= 2 * nprobe


def test_refine_reranks_pq_candidates():
    """A short list of k * k_factor PQ candidates re-scored exactly beats the PQ order alone."""
    dim, n, k = 64, 4000, 4
    base, queries = clustered(n, dim, 2), clustered(100, dim, 3)
    index = fill_index(train_index("IVF32,PQ16x4fs,Refine(SQfp16)", base), base, block=4000)
    _, true_ids = exact(base, queries, k)

    def recall(k_factor: int) -> float:
        set_search_params(index, 32, 16, k_factor=k_factor)
        ids = index.search(queries, k)[1]
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, true_ids, strict=True)])

    assert recall(1) < recall(DEFAULT_K_FACTOR) >= 0.95


def test_auto_lists_grow_with_the_data_and_get_39_training_vectors_each():
    sizes = [10**5, 10**6, 2 * 10**6, 5 * 10**6, 10**7, 5 * 10**7, 10**8, 3 * 10**8, 10**9]
    lists = [ivf_lists(n) for n in sizes]
    assert lists == sorted(lists) and lists[0] < lists[-1]
    assert lists[sizes.index(10**6)] == 4096 and lists[sizes.index(10**7)] == 16384
    assert lists[-1] == MAX_LISTS
    for n in sizes[1:]:
        factory = choose_factory(n, 384, train_sample=100_000)
        nlist = ivf_lists(n)
        assert factory.startswith(f"IVF{nlist}")
        assert "HNSW" not in factory  # flat (exact) coarse quantizer at every size
        assert train_sample_size(factory, n, 100_000) >= MIN_TRAIN_PER_LIST * nlist  # auto raises it
        assert train_sample_size(factory, n, 5_000_000) == min(n, 5_000_000)  # never lowers it
    # small databases: the lists shrink so the data itself gives 39 vectors to each
    for n in (500, 5_000, 50_000, 300_000):
        factory = choose_factory(n, 384, memory_budget_gb=1e-6)
        assert factory.startswith(f"IVF{ivf_lists(n)},")
        assert ivf_lists(n) == 16 or n >= MIN_TRAIN_PER_LIST * ivf_lists(n)
        assert train_sample_size(factory, n, 100_000) == min(
            n, max(100_000, MIN_TRAIN_PER_LIST * ivf_lists(n))
        )


def test_auto_factories_are_buildable():
    seen = set()
    for n in (1_000, 99_999, 100_000, 999_999, 10**6, 10**7, 10**8, 10**9):
        for dim in (16, 64, 100, 384, 768, 1024):
            for budget in (None, 1e-4, 1.0, 64.0):
                factory = choose_factory(n, dim, budget)
                seen.add(factory.split("IVF")[0] + factory.split(",", 1)[-1])
                index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
                assert index.d == dim and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert choose_factory(10**7, 384) == "IVF16384,PQ96x4fs,Refine(SQfp16)"
    assert choose_factory(10**7, 384, memory_budget_gb=1.0) == "IVF16384,PQ96x4fs"  # 56 B/vector
    assert len(seen) > 5
