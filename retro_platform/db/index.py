"""FAISS index choice, training on a sample, and adding vectors in blocks, one index per shard.

``auto`` follows the FAISS wiki's guidelines ("Guidelines to choose an index") as autofaiss applies
them, on the total number of vectors to index n (all shards) and ``database.index.memory_budget_gb``:
  * n < 100k and Flat fits the budget (n * 4 * dim bytes) -> ``Flat`` (exact; brute force is fast);
  * n < 2M and HNSW fits the budget (n * (4*dim + 8*32) bytes) -> ``HNSW32`` (no training, high recall);
  * otherwise ``IVF{nlist},PQ{m}``: nlist = 4*sqrt(n) rounded to a power of two, lowered until the
    training sample (``database.index.train_sample``, capped at n) has >= 39 vectors per list (and at
    least 16 lists); m = dim/8 sub-quantizers of 8 bits (dim/8 bytes per vector, 48 for MiniLM's 384).
All indexes use inner product on normalised vectors (cosine similarity). Searches set ``nprobe`` (IVF)
and ``efSearch`` (HNSW) from config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re

import faiss
import numpy as np

from retro_platform.errors import DatabaseError

logger = logging.getLogger(__name__)


def choose_factory(
    n_vectors: int, dim: int, memory_budget_gb: float | None = None, train_sample: int | None = None
) -> str:
    """The ``auto`` index for n vectors of dimension dim within a memory budget (None = unlimited).

    ``train_sample`` (None = n) bounds the IVF list count so every list gets >= 39 training vectors.
    """
    budget = float("inf") if memory_budget_gb is None else memory_budget_gb * 1024**3
    flat_bytes = n_vectors * dim * 4
    if n_vectors < 100_000 and flat_bytes <= budget:
        return "Flat"
    if n_vectors < 2_000_000 and n_vectors * (dim * 4 + 8 * 32) <= budget:
        return "HNSW32"
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(n_vectors), 16)))
    trainable = min(n_vectors, train_sample or n_vectors)
    nlist = min(nlist, max(16, 2 ** int(math.log2(max(trainable // 39, 16)))))
    pq_m = next(m for m in (dim // 8, 64, 48, 32, 16, 8, 4) if m > 0 and dim % m == 0)
    return f"IVF{nlist},PQ{pq_m}"


def min_training_vectors(factory: str) -> int:
    """Fewest training vectors FAISS can train ``factory`` with (0 for indexes without training)."""
    need = 0
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        need = max(need, int(ivf.group(1)))
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        bits = int(pq.group(2) or 8)
        need = max(need, 2**bits)
    return need


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, with a clear error for a bad string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise DatabaseError(
            f"database.index.factory {factory!r} is not a valid FAISS factory string ({str(exc).splitlines()[0]})"
        ) from None


def _to_gpu(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index), True
    if use_gpu:
        logger.warning("database.index.use_gpu is set but this FAISS build has no GPU: using the CPU")
    return index, False


def train_index(factory: str, sample: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    """An empty index of ``factory`` trained on ``sample`` [n, dim] (float32)."""
    dim = sample.shape[1]
    index = new_index(factory, dim)
    if index.is_trained:
        return index
    need = min_training_vectors(factory)
    if len(sample) < need:
        raise DatabaseError(
            f"index {factory!r} needs at least {need} training vectors but the database has {len(sample)}; "
            "use a smaller index (fewer IVF lists / PQ bits), 'Flat', or database.index.factory=auto"
        )
    work, on_gpu = _to_gpu(index, use_gpu)
    work.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def fill_index(trained: faiss.Index, vectors: np.ndarray, block: int, use_gpu: bool = False) -> faiss.Index:
    """A copy of the trained index with ``vectors`` added in blocks (FAISS id = row number)."""
    index = faiss.clone_index(trained)
    work, on_gpu = _to_gpu(index, use_gpu)
    for start in range(0, len(vectors), block):
        work.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """Apply nprobe (IVF) and efSearch (HNSW) where the index has them."""
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        with contextlib.suppress(RuntimeError):  # the index has no such parameter
            params.set_index_parameter(index, name, value)
