"""Shared fixtures: one local Ray for the session and a small real database built once.

* ``ray_session``: a local Ray (``address="local"``: never joins another engineer's cluster) with 2
  CPUs, a 1 GB object store and no dashboard, shared by every test of the session and shut down at
  the end. Only this Ray is stopped (never `ray stop`, which kills every Ray process of the machine).
  Remember that actors and Ray Data pools must leave CPU for tasks: on 2 CPUs use fractional
  ``num_cpus`` (see STACK-NOTES).
* ``debug_db``: ``(config, manifest)`` of the ``debug`` preset's database, built once per session
  into a temporary work dir (300 real Wikipedia summaries, vocab 1024, 2 train shards + 1 valid
  shard, Flat index, MLflow run in ``<work_dir>/mlflow.db``). Treat it as read-only: copy
  ``config.db_path`` into ``tmp_path`` before re-building or damaging it.
* ``ray_head``: a real Ray head started with ``ray start --head`` on loopback (job submission, commands
  that join a cluster), shared by the session.
* ``debug_config(work_dir, *overrides)``: the debug preset with everything under ``work_dir``.
* ``synthetic_manifest(...)``: a complete ``Manifest`` of a database that was never built.
* ``randomise_position_biases(model)``: random values for the cross-attentions' position parameters.
"""

from __future__ import annotations

import os

# Ray Data binds its log handler to the sys.stderr of its import: import it before a test's capsys swaps
# stderr, or the next test's CLI logs into a closed capture stream.
import pytest
import ray.data  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


def debug_config(work_dir, *overrides: str):
    """The debug preset with everything under ``work_dir`` (plus ``--set`` style overrides)."""
    from retro_platform.config import load_config

    return load_config("debug", [f"work_dir={work_dir}", *overrides])


def precomputed_copy(debug_db, tmp_path_factory, folder: str, experiment: str):
    """A copy of the debug database in a new temp ``folder``, with its precomputed neighbour table (made
    on the session's Ray) -> its config, tracked in the MLflow ``experiment``."""
    import shutil

    from retro_platform.commands.query_neighbors import precompute_neighbors

    source, _ = debug_db
    work = tmp_path_factory.mktemp(folder)
    shutil.copytree(source.db_path, work / "db")
    config = debug_config(work, f"tracking.experiment={experiment}")
    precompute_neighbors(config)
    return config


def synthetic_manifest(
    chunk_len: int = 64,
    vocab_size: int = 512,
    pad_id: int = 0,
    tokenizer_sha256: str = "abc",
    splits: dict | None = None,
    index_vectors: tuple[int, ...] = (),
):
    """A complete Manifest with the given chunk length, tokenizer, chunk-store shards (``splits``: split ->
    list of SplitShard) and index shards (vectors per shard), and placeholders for everything else."""
    from retro_platform.db.layout import FORMAT_VERSION
    from retro_platform.db.manifest import Counts, EncoderInfo, IndexInfo, IndexShard, Manifest, TokenizerInfo

    shards, start = [], 0
    for i, n in enumerate(index_vectors):
        shards.append(IndexShard(i, "train", i, start, start + n, doc_start=0, doc_end=0, n_vectors=n))
        start += n
    return Manifest(
        format_version=FORMAT_VERSION,
        status="complete",
        fingerprint="synthetic",
        files={},
        db_id="synthetic",
        config={},
        chunk_len=chunk_len,
        tokenizer=TokenizerInfo("tokenizer.json", tokenizer_sha256, vocab_size, pad_id, eod_id=1),
        encoder=EncoderInfo("synthetic", "synthetic", dim=8, dtype="float16", normalized=True),
        counts=Counts(0, 0, documents={}, chunks={}, tokens=0, padding_fraction=0.0),
        splits=splits or {},
        index=IndexInfo("Flat", "Flat", "inner_product", False, "index/trained.faiss", shards),
        neighbors={},
    )


def randomise_position_biases(model) -> None:
    """Give a Retro model's cross-attention position parameters (relative biases and previous-token key
    weights) random values, so tests comparing two code paths also compare how each applies them."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("rel_bias", "key_shift")):
                p.normal_(0.0, 1.0)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=1024**3,
        include_dashboard=False,
        namespace="retro-tests",
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def debug_db(ray_session, tmp_path_factory):
    """(config, manifest) of the debug database: 300 real Wikipedia summaries, 2 shards, Flat."""
    from retro_platform.commands.build_db import build_database

    work = tmp_path_factory.mktemp("debug-work")
    config = debug_config(work)
    manifest = build_database(config)
    return config, manifest


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head (``ray start --head``, 2 CPUs, its job server on 127.0.0.1: ``tests/local_head.py``)
    shared by the tests that submit jobs to a cluster or join one, stopped at the end. Its processes
    never have the S3 test server's variables (``s3_server.ENV_NAMES``), whenever it starts: workers get
    them only through what the platform passes (its runtime env)."""
    from local_head import LocalHead
    from s3_server import ENV_NAMES

    head = LocalHead(num_cpus=2, without_env=ENV_NAMES)
    try:
        head.wait_for_dashboard()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server for the session: moto's standalone ``moto_server`` on 127.0.0.1 on a
    free port (``tests/s3_server.py``), stopped at the end.

    While it runs, this process's environment points every AWS client at it (the previous values are
    restored at the end): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_REGION,
    AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 and MLFLOW_S3_ENDPOINT_URL (MLflow's S3 artifact store).
    Ray workers see them only if they are passed on: a Ray started before this fixture (e.g.
    ``ray_session``) inherited the environment without them, so the platform's
    ``ray_utils.runtime_env_vars()`` must include ``retro_platform.storage.aws_env_vars()`` for
    workers to reach the server (a worker without them sends unsigned requests, which moto refuses for
    writes with AccessDenied, as a real S3 does)."""
    from s3_server import S3Server

    server = S3Server()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in server.env().items():
                mp.setenv(name, value)
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on ``s3_server``, as ``"s3://<bucket>"``."""
    return f"s3://{s3_server.create_bucket()}"
