"""Stages 2-3 of the build: the tokenizer (trained on a bounded sample in one task) and the chunk store.

Chunk and document ids are contiguous over the database: a task per bucket counts its chunks, the
driver turns the counts into each shard's first document and chunk id, and a task per shard writes its
chunk store. Shard ``s`` of a split holds the documents of bucket ``s`` (empty buckets give no shard).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from retro_platform import storage
from retro_platform.config import PlatformConfig, TokenizerConfig
from retro_platform.db import chunk as chunking
from retro_platform.db.build.documents import Bucket, Documents
from retro_platform.db.build.ledger import Ledger
from retro_platform.db.build.streams import write_parquet_blocks
from retro_platform.db.build.tasks import build_resources, run_tasks
from retro_platform.db.files import parquet_file
from retro_platform.db.layout import SPLITS, Location
from retro_platform.db.manifest import SplitShard
from retro_platform.db.tokenizer import load_tokenizer_file, save_tokenizer_atomic, train_tokenizer

logger = logging.getLogger(__name__)


def train_tokenizer_on_sample(document_files: list[str], config: TokenizerConfig, out: str) -> str:
    """Train the tokenizer on the first ``config.sample_documents`` training documents (buckets in
    order, each in corpus order) and save it to ``out`` -> its sha256. Runs as one Ray task."""

    def texts():
        left = config.sample_documents
        for path in document_files:
            for batch in parquet_file(path).iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column("text").to_pylist()[:left]:
                    yield text
                    left -= 1
                if left <= 0:
                    return

    return save_tokenizer_atomic(train_tokenizer(texts(), config), out)


def prepare_tokenizer(config: PlatformConfig, ledger: Ledger, documents: Documents, staging: str) -> Location:
    """The tokenizer file the build uses: the database's when current, else the configured file, else one
    trained on a sample of the training documents (into the staging folder; the database gets it once
    every input check passed)."""
    layout = ledger.layout
    if ledger.is_current(layout.tokenizer, []):
        logger.info("tokenizer: up to date")
        return layout.tokenizer
    if config.database.tokenizer.path:
        load_tokenizer_file(config.database.tokenizer.path)  # refuses a bad file before anything is written
        path = config.database.tokenizer.path
        return path if storage.is_remote(path) else Path(path).expanduser()
    out = storage.join(staging, "tokenizer.json")
    files = [b.path for b in documents.buckets["train"]]
    run_tasks(
        "tokenizer",
        train_tokenizer_on_sample,
        [{"document_files": files, "config": config.database.tokenizer, "out": out}],
        build_resources(config),
    )
    return out


def worker_tokenizer(tokenizer_file: str):
    """The tokenizer of a file, loaded once per worker process and version of the file: ``tokenizers``
    does not free a tokenizer's cache with it (~5 MB a load), so a task per shard must not load its own."""
    info = storage.file_info(tokenizer_file)
    return _cached_tokenizer(str(tokenizer_file), info.size, info.mtime_ns, info.etag)


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(tokenizer_file: str, size: int, mtime_ns: int | None, etag: str | None):
    return load_tokenizer_file(tokenizer_file)


DOCUMENT_BATCH = 256
"""Documents tokenized and chunked per block by the chunking tasks."""


def count_bucket(
    path: str, tokenizer_file: str, chunk_len: int, record: str | None = None, fingerprint: str = ""
) -> dict[str, int]:
    """Chunks and real tokens of one bucket's documents (one Ray task per bucket), streamed a batch of
    documents at a time. With ``record`` (a JSON file in the staging folder) the counts are kept for a
    later run: counts recorded for the same bucket ``fingerprint``, tokenizer bytes and chunk length are
    returned without tokenizing anything."""
    key = ""
    if record is not None:
        key = hashlib.sha256(
            f"{fingerprint}/{storage.sha256(tokenizer_file)}/{chunk_len}".encode()
        ).hexdigest()
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded = json.loads(storage.read_bytes(record))
            if recorded["key"] == key:
                return {"chunks": int(recorded["chunks"]), "tokens": int(recorded["tokens"])}
    tokenizer = worker_tokenizer(tokenizer_file)
    chunks = tokens = 0
    for batch in parquet_file(path).iter_batches(batch_size=DOCUMENT_BATCH, columns=["text"]):
        for ids in chunking.document_token_ids(batch.column("text").to_pylist(), tokenizer):
            chunks += max(1, -(-len(ids) // chunk_len))
            tokens += len(ids)
    if record is not None:
        storage.write_bytes_atomic(
            record, json.dumps({"key": key, "chunks": chunks, "tokens": tokens}).encode()
        )
    return {"chunks": chunks, "tokens": tokens}


def counts_record(staging: str, bucket: Bucket) -> str:
    """Where a bucket's chunk counts are kept in the staging folder."""
    return storage.join(staging, "buckets", bucket.split, f"bucket-{bucket.bucket:04d}.counts.json")


def plan_shards(
    config: PlatformConfig, documents: Documents, tokenizer_file: Location, staging: str | None = None
) -> tuple[dict[str, list[SplitShard]], int]:
    """Every shard's document and chunk id ranges (train shards first, then valid), from per-bucket
    counts -> (shards of each split, real tokens in the database). With ``staging`` the counts are
    kept there, and counts an earlier run kept for the same documents and tokenizer are reused."""
    buckets: list[Bucket] = [b for split in SPLITS for b in documents.buckets[split]]
    counts = run_tasks(
        "chunks.count",
        count_bucket,
        [
            {
                "path": b.path,
                "tokenizer_file": str(tokenizer_file),
                "chunk_len": config.database.chunk_len,
                **(
                    {"record": counts_record(staging, b), "fingerprint": b.fingerprint}
                    if staging is not None and b.fingerprint
                    else {}
                ),
            }
            for b in buckets
        ],
        build_resources(config),
        num_cpus=0.5,
    )
    plans: dict[str, list[SplitShard]] = {split: [] for split in SPLITS}
    doc_start = chunk_start = 0
    for bucket, count in zip(buckets, counts, strict=True):
        plans[bucket.split].append(
            SplitShard(
                shard=bucket.bucket,
                split=bucket.split,
                doc_start=doc_start,
                doc_end=doc_start + bucket.n_docs,
                chunk_start=chunk_start,
                chunk_end=chunk_start + count["chunks"],
            )
        )
        doc_start += bucket.n_docs
        chunk_start += count["chunks"]
    return plans, sum(c["tokens"] for c in counts)


def write_shard(
    documents_file: str, tokenizer_file: str, chunk_len: int, shard: dict[str, Any], out: str, row_group: int
) -> str:
    """Cut one bucket's documents into the chunk store of its shard (ids from the plan) -> sha256.

    Streams: ``DOCUMENT_BATCH`` documents are tokenized and chunked at a time and written in row groups
    of ``row_group`` chunks, byte-identical to writing the whole shard's table at once."""
    tokenizer = worker_tokenizer(tokenizer_file)

    def blocks():
        doc_id, chunk_id = shard["doc_start"], shard["chunk_start"]
        for batch in parquet_file(documents_file).iter_batches(
            batch_size=DOCUMENT_BATCH, columns=["id", "text"]
        ):
            ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
            docs = [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]
            table = chunking.chunk_documents(docs, tokenizer, chunk_len, doc_id, chunk_id)
            doc_id += len(docs)
            chunk_id += table.num_rows
            yield table

    sha256, rows = write_parquet_blocks(out, chunking.CHUNK_SCHEMA, blocks(), row_group)
    if rows != shard["chunk_end"] - shard["chunk_start"]:
        storage.delete(out)
        raise RuntimeError(f"shard {shard['shard']}: chunk count changed between planning and writing")
    return sha256


def write_chunks(
    config: PlatformConfig,
    ledger: Ledger,
    documents: Documents,
    tokenizer_file: Location,
    plans: dict[str, list[SplitShard]],
) -> int:
    """Write every chunk-store shard that is not current (a task per shard) -> chunks written."""
    layout = ledger.layout
    by_bucket = {(b.split, b.bucket): b.path for split in SPLITS for b in documents.buckets[split]}
    todo = [
        s
        for split in SPLITS
        for s in plans[split]
        if not ledger.is_current(layout.chunks(split, s.shard), [layout.tokenizer])
    ]
    if not todo:
        logger.info("chunks: all %d shards up to date", sum(len(p) for p in plans.values()))
        return 0
    calls = [
        {
            "documents_file": by_bucket[(s.split, s.shard)],
            "tokenizer_file": str(tokenizer_file),
            "chunk_len": config.database.chunk_len,
            "shard": {
                "shard": s.shard,
                **{k: getattr(s, k) for k in ("doc_start", "chunk_start", "chunk_end")},
            },
            "out": str(layout.chunks(s.split, s.shard)),
            "row_group": config.database.embed.rows_per_task,
        }
        for s in todo
    ]

    def recorded(i: int, sha256: str) -> None:
        ledger.record(layout.chunks(todo[i].split, todo[i].shard), [layout.tokenizer], sha256)

    run_tasks("chunks.write", write_shard, calls, build_resources(config), num_cpus=0.5, on_result=recorded)
    return int(np.sum([s.num_chunks for s in todo]))
