"""FAISS index choice, training on a sample, and adding vectors in blocks, one index per shard.

``auto`` sizes the index to the data. ``n`` is the number of vectors of all shards together, ``dim``
their width, the budget ``database.index.memory_budget_gb`` (None = unlimited):

  * n < 100k and Flat fits the budget (n * 4 * dim bytes) -> ``Flat`` (exact; brute force is fast);
  * n < 1M and HNSW fits the budget (n * (4*dim + 8*32) bytes) -> ``HNSW32`` (no training, high
    recall; a 1M-vector graph already takes ~8 minutes to add on 2 cores, is held whole in memory and
    cannot be memory-mapped; 1M is also where autofaiss stops considering unquantized indexes
    (``ivf_flat_threshold``) and where the FAISS wiki's guidelines move to ``IVF65536_HNSW32``);
  * otherwise ``IVF{nlist},PQ{dim/4}x4fs,Refine(SQfp16)``:

    - ``nlist`` = 4*sqrt(n) rounded to a power of two (the low end of the FAISS wiki's 4-16*sqrt(n)),
      so a query that scans ``nprobe`` lists reads nprobe * sqrt(n)/4 codes instead of a fixed share
      of the data: 1M -> 4,096 lists, 10M -> 16,384, 50M -> 32,768, 268M and more -> 65,536 (the
      cap: the list count of Megatron-LM's RETRO Wikipedia index and of autofaiss for 10-300M
      vectors). At most n/39 lists (FAISS k-means wants >= 39 training vectors per centroid) and at
      least 16. The low end keeps recall at a fixed ``database.index.nprobe``: every doubling of the
      lists halves the share of the data nprobe lists cover. On real MiniLM embeddings of the packaged
      corpus recall@2 at nprobe 16 falls from 0.961 to 0.920 as the lists go 128 -> 1,024; nprobe 32
      (the default) keeps it at 0.990 -> 0.955 (benchmarks/RESULTS-pool.md).
    - the coarse quantizer is flat (exact) at every list count. autofaiss uses an HNSW32 graph
      (``IVF{nlist}_HNSW32``) from 1,000 lists, the FAISS wiki from 65,536, Megatron-LM ``_HNSW8`` /
      ``_HNSW32``, and ``auto`` did from 16,384 lists until it was measured: at 10M clustered vectors
      ``IVF16384_HNSW32,PQ96x4fs,Refine(SQfp16)`` found recall@2 0.48-0.53 (nprobe 16-32, k_factor 64
      or 256), because the graph assigns vectors to lists approximately, at add time with FAISS's
      default efSearch 16: over 16,384 centroids of that data HNSW32 returns the nearest centroid for
      27% of vectors at efSearch 16, 55% at 64, 91% at 256 (benchmarks/RESULTS-pool.md). A flat
      quantizer costs nlist * dim multiply-adds a query (6.3M at 16k lists of 384-d, batched as a
      matrix product); a user who wants the graph passes the factory, and then vectors are added
      with efSearch ``QUANTIZER_ADD_EF_SEARCH`` and searched with efSearch >= 2*nprobe.
    - codes: 4-bit fast-scan PQ, ``dim/4`` sub-quantizers (dim/8 bytes a vector: 48 for MiniLM's 384,
      as many as the 8-bit ``PQ{dim/8}`` it replaces, but scanned with SIMD and trained in a fraction
      of the time: benchmarks/RESULTS-pool.md). autofaiss and Megatron-LM use OPQ + 8-bit PQ without
      re-ranking; with exact re-ranking the codes only have to bring the true neighbours into the
      short list.
    - ``Refine(SQfp16)``: FAISS's refine stage keeps an fp16 copy of every vector in the index and
      re-scores the ``k * k_factor`` best PQ candidates exactly (the build stores the embeddings in
      fp16, so fp16 re-scoring is exact for them). ``k_factor`` is set to ``DEFAULT_K_FACTOR`` at
      training, is saved in the index file, and ``set_search_params`` can override it. Memory:
      2*dim bytes a vector (768 at 384-d) on top of the dim/8 code bytes and the 8-byte id, 824 bytes
      a vector in all at 384-d. When that does not fit the budget the refine stage is dropped
      (``IVF...,PQ{dim/4}x4fs``: dim/8 + 8 bytes a vector).

Training sample: IVF k-means needs >= 39 vectors per list, so for IVF indexes the sample is
``train_sample_size``: ``database.index.train_sample`` raised to 39 * nlist (at most
``MAX_TRAIN_SAMPLE`` = 39 * 65,536 = 2.56M vectors, 3.9 GB float32 in the training task) and capped
at n. ``database.index.train_sample`` therefore no longer bounds the list count (until issue 15 it
capped ``auto`` at 100k/39 -> 2,048 lists); it is the floor of the sample. autofaiss trains on
100 vectors per list (at least 31), Megatron-LM's Wikipedia index on 1M vectors for 65,536 lists.

Files: read with ``MMAP_READ_FLAGS`` (``faiss.IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``, faiss >= 1.11),
a shard memory-maps its Flat vectors, HNSW storage, IVF-Flat/IVF-PQ lists and the refine stage's fp16
copies; fast-scan PQ lists (dim/8 + 8 bytes a vector) and graphs are read into memory. Measured on the
1M-vector ``auto`` index (benchmarks/RESULTS-pool.md): an 833 MB file, 59 MB resident after the read,
the rest file pages of the page cache (shared by the actors of a node, evictable). ``IO_FLAG_MMAP``
alone maps only the inverted lists (the fp16 copies, 93% of the file, are read into memory) and
cannot be combined with ``IO_FLAG_MMAP_IFC`` ("mmap only supported for File objects").

All indexes use inner product on normalised vectors (cosine similarity). Searches set ``nprobe``
(IVF), ``efSearch`` (HNSW, and the HNSW coarse quantizer) and ``k_factor`` (refine) from config.
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

FLAT_MAX_VECTORS = 100_000
"""``auto`` uses Flat below this many vectors (when it fits the memory budget)."""
HNSW_MAX_VECTORS = 1_000_000
"""``auto`` uses HNSW32 below this many vectors (when it fits the memory budget)."""
MIN_TRAIN_PER_LIST = 39
"""FAISS k-means warns below 39 training vectors per centroid."""
MIN_LISTS = 16
MAX_LISTS = 65_536
"""``auto``'s largest IVF list count (Megatron-LM's Wikipedia index; autofaiss for 10-300M vectors)."""
QUANTIZER_ADD_EF_SEARCH = 256
"""efSearch of an HNSW coarse quantizer (a given ``IVF{n}_HNSW{m}`` factory) while vectors are added:
each vector goes to the list the graph finds, so a low value scatters neighbours over wrong lists
(FAISS's default 16 finds the nearest of 16,384 centroids for 27% of vectors here; 256: 91%)."""
MAX_TRAIN_SAMPLE = MIN_TRAIN_PER_LIST * MAX_LISTS
"""Largest sample ``train_sample_size`` raises an IVF index's training sample to (2,555,904)."""
DEFAULT_K_FACTOR = 64
"""Refine stage: candidates re-scored exactly per result (k * k_factor), set when the index is trained.

64 gives recall@2 0.993-0.997 on the 1M and 3M clustered benchmarks (50 and 150 vectors a cluster;
32 is enough at 1M, 0.86 at 3M) at ~14k queries per CPU second at 1M; where hundreds of vectors are
almost equally near a query (500 a cluster) PQ cannot order them and the short list must cover them
all: 0.75 at 64, 0.93 at 128, 1.000 at 256 (benchmarks/RESULTS-pool.md). Raise it per pool with
``set_search_params(..., k_factor=...)``."""
MMAP_READ_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
"""``faiss.read_index`` flags that memory-map flat vectors, IVF-Flat/IVF-PQ lists and refine copies
(fast-scan lists and HNSW graphs are read into memory)."""


def ivf_lists(n_vectors: int) -> int:
    """``auto``'s IVF list count for n vectors: 4*sqrt(n) as a power of two, 16..65,536, <= n/39."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n_vectors, 1)), MIN_LISTS)))
    trainable = 2 ** int(math.log2(max(n_vectors // MIN_TRAIN_PER_LIST, MIN_LISTS)))
    return max(MIN_LISTS, min(nlist, MAX_LISTS, trainable))


def pq_codes(dim: int) -> str:
    """Fast-scan PQ with dim/4 sub-quantizers of 4 bits (dim/8 bytes a vector), or 8-bit PQ with the
    largest divisor of dim up to dim/8 for widths fast-scan cannot split."""
    m = next((m for m in range(dim // 4, 1, -1) if dim % m == 0 and m % 2 == 0), 0)
    if m:
        return f"PQ{m}x4fs"
    return f"PQ{next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)}"


def code_bytes(codes: str, dim: int) -> float:
    """Bytes a vector of an IVF list takes: its code and its 8-byte id."""
    m, bits = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:fs)?", codes).groups()
    return int(m) * int(bits or 8) / 8 + 8


def choose_factory(
    n_vectors: int, dim: int, memory_budget_gb: float | None = None, train_sample: int | None = None
) -> str:
    """The ``auto`` index for n vectors of dimension dim within a memory budget (None = unlimited).

    ``train_sample`` is accepted for callers of the earlier rule and no longer bounds the list count:
    the sample is raised to what the lists need instead (``train_sample_size``).
    """
    del train_sample  # see train_sample_size
    budget = float("inf") if memory_budget_gb is None else memory_budget_gb * 1024**3
    if n_vectors < FLAT_MAX_VECTORS and n_vectors * dim * 4 <= budget:
        return "Flat"
    if n_vectors < HNSW_MAX_VECTORS and n_vectors * (dim * 4 + 8 * 32) <= budget:
        return "HNSW32"
    nlist = ivf_lists(n_vectors)
    quantizer = f"IVF{nlist}"
    codes = pq_codes(dim)
    if n_vectors * (code_bytes(codes, dim) + 2 * dim) <= budget:
        return f"{quantizer},{codes},Refine(SQfp16)"
    return f"{quantizer},{codes}"


def train_sample_size(factory: str, n_vectors: int, train_sample: int) -> int:
    """Vectors to train ``factory`` on when n vectors are indexed and ``database.index.train_sample``
    is ``train_sample``: for IVF indexes raised to 39 per list (at most ``MAX_TRAIN_SAMPLE``), never
    more than n."""
    need = train_sample
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        need = max(train_sample, min(MIN_TRAIN_PER_LIST * int(ivf.group(1)), MAX_TRAIN_SAMPLE))
    return max(0, min(n_vectors, need))


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


def _has_gpu(use_gpu: bool) -> bool:
    """Whether to use a GPU: asked for and present (a warning when asked for and absent)."""
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return True
    if use_gpu:
        logger.warning("database.index.use_gpu is set but this FAISS build has no GPU: using the CPU")
    return False


def _to_gpu(index: faiss.Index, gpu: bool) -> tuple[faiss.Index, bool]:
    if not gpu:
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError as exc:  # e.g. fast-scan PQ and refine stages have no GPU version
        logger.warning("FAISS cannot move %s to the GPU (%s): using the CPU", type(index).__name__, exc)
        return index, False


def train_index(factory: str, sample: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    """An empty index of ``factory`` trained on ``sample`` [n, dim] (float32).

    A refine stage gets ``k_factor = DEFAULT_K_FACTOR``. On a GPU the IVF k-means runs there (the
    index's ``clustering_index``, as Megatron-LM's RETRO index does) when the index cannot move whole.
    """
    dim = sample.shape[1]
    index = new_index(factory, dim)
    _set_k_factor(index, DEFAULT_K_FACTOR)
    if index.is_trained:
        return index
    need = min_training_vectors(factory)
    if len(sample) < need:
        raise DatabaseError(
            f"index {factory!r} needs at least {need} training vectors but the database has {len(sample)}; "
            "use a smaller index (fewer IVF lists / PQ bits), 'Flat', or database.index.factory=auto"
        )
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    gpu = _has_gpu(use_gpu)
    work, on_gpu = _to_gpu(index, gpu)
    if gpu and not on_gpu and (ivf := faiss.try_extract_index_ivf(index)) is not None:
        flat = (
            faiss.IndexFlatIP(dim)
            if ivf.metric_type == faiss.METRIC_INNER_PRODUCT
            else faiss.IndexFlatL2(dim)
        )
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)  # k-means on the GPU
    work.train(sample)
    trained = faiss.index_gpu_to_cpu(work) if on_gpu else work
    if (ivf := faiss.try_extract_index_ivf(trained)) is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # saved with the index: every fill adds with it
            quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, QUANTIZER_ADD_EF_SEARCH)
    return trained


def fill_index(trained: faiss.Index, vectors: np.ndarray, block: int, use_gpu: bool = False) -> faiss.Index:
    """A copy of the trained index with ``vectors`` added in blocks (FAISS id = row number)."""
    index = faiss.clone_index(trained)
    work, on_gpu = _to_gpu(index, _has_gpu(use_gpu))
    for start in range(0, len(vectors), block):
        work.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def _set_k_factor(index: faiss.Index, k_factor: float) -> None:
    with contextlib.suppress(RuntimeError):  # no refine stage
        faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", k_factor)


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int, k_factor: int | None = None) -> None:
    """Apply nprobe (IVF), efSearch (HNSW) and k_factor (refine stage) where the index has them.

    An HNSW coarse quantizer (``IVF{n}_HNSW32``) searches with efSearch = max(ef_search, 2 * nprobe):
    it must return nprobe lists, and autofaiss pairs nprobe with 2 * nprobe. ``k_factor`` None keeps
    the index's own (``DEFAULT_K_FACTOR`` for indexes built here).
    """
    params = faiss.ParameterSpace()
    if faiss.try_extract_index_ivf(index) is not None:
        ef_search = max(ef_search, 2 * nprobe)
    values = [("nprobe", nprobe), ("efSearch", ef_search)]
    if k_factor is not None:
        values.append(("k_factor_rf", k_factor))
    for name, value in values:
        with contextlib.suppress(RuntimeError):  # the index has no such parameter
            params.set_index_parameter(index, name, value)
