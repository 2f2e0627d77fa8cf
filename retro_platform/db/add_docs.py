"""Adding documents to a built database as a new shard (`retro add-docs`, the model service's
``POST /v1/documents``); a caller with a running pool then calls ``pool.refresh`` with the new manifest.

The documents go through the build's own stages, on the build's nodes: the given files (.jsonl,
.parquet, folders of .txt/.md; read where the build's workers can see them, as a corpus is) are cut
into corpus pieces that the build's reader tasks parse, validate and stage next to the database (one
bucket: every new document goes into the one new shard), where the collation task checks the new ids
are unique; a task per existing chunk-store shard checks the new ids against its ``doc_key`` column; a
task counts the new chunks and another writes the chunk store with the database's tokenizer (new doc
and chunk ids after every existing one); the encoder actor pool embeds it with the database's own
encoder settings (from the manifest; one encode call per row group, as the build does, so the vectors
are those the build would give for the same texts) and writes the vectors; the build's fill task adds
them to a copy of the trained index and writes the index shard with its token and doc-id arrays. Every
file is written by the task that made it, which reports its sha256; the driver plans, then updates and
writes the manifest.

Bad input (unreadable files, duplicate ids, no documents) is refused before the first file of the
database is written, leaving it byte-for-byte as it was. The manifest, with checksums of the new files,
is replaced atomically at the end, so an interrupted add leaves the database as it was (the new shard's
files, not in the manifest, are removed when the add fails and overwritten by the next one).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.build.chunks import count_bucket, write_shard
from retro_platform.db.build.documents import stage_documents, staged_tables
from retro_platform.db.build.embeddings import embed_shards
from retro_platform.db.build.indexing import fill_task, index_resources
from retro_platform.db.build.tasks import build_resources, run_tasks
from retro_platform.db.corpus import Piece, corpus_pieces
from retro_platform.db.files import read_table
from retro_platform.db.layout import DatabaseLayout, Location
from retro_platform.db.manifest import IndexShard, Manifest, SplitShard, validate_database, write_manifest
from retro_platform.errors import CorpusError
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)

ADDED = "added"
"""Split name of documents added after the build."""

STAGED_SPLIT = "train"
"""The staging split every new document is read into (one bucket, with no validation hold-out)."""

MAX_CONFLICTS = 5
"""Conflicting ids a duplicate-check task reports (the error names the first in input order)."""


def input_pieces(files: list[str], piece_bytes: int) -> list[Piece]:
    """The corpus pieces of every given file, folder or glob (local or ``s3://``), numbered in the order
    given (so errors and the new documents' order follow the files as given, then their lines/rows/names)."""
    pieces: list[Piece] = []
    for name in files:
        # absolute: Ray workers run in another working directory
        path = name if storage.is_remote(name) else str(Path(name).expanduser().absolute())
        if not any(char in path for char in "*?[") and not storage.exists(path):
            raise CorpusError(
                f"{path} does not exist; give .jsonl or .parquet files, folders of .txt/.md, or globs, "
                "local or s3://"
            )
        for piece in corpus_pieces(path, piece_bytes):
            pieces.append(dataclasses.replace(piece, index=len(pieces)))
    return pieces


def reader_config(config: PlatformConfig, files: list[str]) -> PlatformConfig:
    """The settings the build's document stage reads the new documents with: one bucket of one split
    (the new shard), every document kept, nothing held out or mirrored."""
    db = config.database
    corpus = dataclasses.replace(
        db.corpus,
        source=", ".join(files),
        max_documents=None,
        valid_fraction=0.0,
        mirror=False,
        exclude_ids=[],
    )
    return dataclasses.replace(config, database=dataclasses.replace(db, num_shards=1, corpus=corpus))


def find_conflicts(chunks_file: str, staging: str) -> dict[str, Any]:
    """One existing chunk-store shard against the staged new documents (a Ray task per shard): the new
    non-empty documents whose id is a ``doc_key`` of the shard -> {count, first: up to MAX_CONFLICTS
    [piece, row, where, id] in input order}."""
    keys = read_table(chunks_file, ["doc_key"]).column("doc_key").unique()
    found: list[list[Any]] = []
    count = 0
    # the staged new documents: one bucket of one split (reader_config), one row group per piece file
    columns = ["id", "where", "piece", "row", "rank"]
    for staged in staged_tables(staging, STAGED_SPLIT, 0, {"train": 1, "valid": 1}, columns=columns):
        hits = staged.filter(
            pc.and_(pc.is_in(staged["id"], value_set=keys), pc.greater_equal(staged["rank"], 0))
        )
        count += hits.num_rows
        found += [
            [r["piece"], r["row"], r["where"], r["id"]] for r in hits.slice(0, MAX_CONFLICTS).to_pylist()
        ]
    return {"count": count, "first": sorted(found)[:MAX_CONFLICTS]}


def check_new_ids(config: PlatformConfig, layout: DatabaseLayout, manifest: Manifest, staging: str) -> None:
    """Refuse new documents whose id is already in the database: a task per existing shard checks the new
    ids against its ``doc_key`` column, so the existing ids never reach the driver."""
    shards = [(split, s.shard) for split, entries in manifest.splits.items() for s in entries]
    calls = [{"chunks_file": str(layout.chunks(split, n)), "staging": staging} for split, n in shards]
    results = run_tasks("add_docs.ids", find_conflicts, calls, build_resources(config), num_cpus=0.5)
    conflicts = sorted(c for r in results for c in r["first"])
    if conflicts:
        _, _, where, doc_id = conflicts[0]
        total = sum(r["count"] for r in results)
        raise CorpusError(
            f"{where}: document id {doc_id!r} is already in the database {layout.root}"
            + (f" ({total} of the new documents are)" if total > 1 else "")
            + "; ids must be unique: rename the new documents, or rebuild the database with them in its corpus"
        )


def encoder_settings(config: PlatformConfig, manifest: Manifest) -> dict[str, Any]:
    """The database's own encoder settings (``Embedder.from_manifest``'s) for the encoder actors; on GPU
    actors the configured GPU batch size, as the build uses."""
    encoder = manifest.encoder
    embed = config.database.embed
    batch_size = 64 if encoder.batch_size is None else encoder.batch_size
    return dict(
        model=encoder.name,
        compute_dtype="auto" if encoder.compute_dtype is None else encoder.compute_dtype,
        batch_size=embed.gpu_batch_size if embed.gpus_per_actor > 0 else batch_size,
        out_dtype=encoder.dtype,
    )


def rows_per_row_group(config: PlatformConfig, manifest: Manifest) -> int:
    """Rows per chunk-store row group (= per encode call) the database was built with."""
    recorded = (manifest.fingerprint_inputs or {}).get("embed.rows_per_task")
    if recorded is None:
        recorded = ((manifest.config or {}).get("embed") or {}).get("rows_per_task")
    return int(recorded or config.database.embed.rows_per_task)


def add_documents(config: PlatformConfig, files: list[str]) -> Manifest:
    """Add the documents of ``files`` as a new shard -> the database's new manifest (its last index shard
    is the new one: ``NeighborPool.refresh(config, manifest)`` starts serving it)."""
    with ray_session(config):
        manifest = validate_database(config.db_path)
        layout = DatabaseLayout(config.db_path)
        staging = layout.staging("add-docs")  # apart from the build's
        storage.delete_tree(staging)  # what an interrupted add staged
        try:
            manifest = _add(config, manifest, layout, files, staging)
        finally:
            storage.delete_tree(staging)
        return manifest


def _add(
    config: PlatformConfig, manifest: Manifest, layout: DatabaseLayout, files: list[str], staging: str
) -> Manifest:
    t_start = time.perf_counter()
    resources = build_resources(config)
    # 1. everything that can refuse the input, before the first file of the database is written
    pieces = input_pieces(files, int(config.database.corpus.piece_mb * 1024**2))
    documents = stage_documents(reader_config(config, files), staging, pieces)
    (bucket,) = documents.buckets[STAGED_SPLIT]  # stage_documents refuses input with no documents
    check_new_ids(config, layout, manifest, staging)
    tokenizer_file = str(layout.tokenizer)
    (count,) = run_tasks(
        "chunks.count",
        count_bucket,
        [{"path": bucket.path, "tokenizer_file": tokenizer_file, "chunk_len": manifest.chunk_len}],
        resources,
        num_cpus=0.5,
    )
    all_shards = [s for shards in manifest.splits.values() for s in shards]
    doc_start = max(s.doc_end for s in all_shards)
    chunk_start = max(s.chunk_end for s in all_shards)
    split_shard = len(manifest.splits.get(ADDED, []))
    index_shard = len(manifest.index.shards)
    shard = SplitShard(
        shard=split_shard,
        split=ADDED,
        doc_start=doc_start,
        doc_end=doc_start + bucket.n_docs,
        chunk_start=chunk_start,
        chunk_end=chunk_start + count["chunks"],
    )
    paths: dict[str, Location] = {
        "chunks": layout.chunks(ADDED, split_shard),
        "embeddings": layout.embeddings(ADDED, split_shard),
        "index": layout.index(index_shard),
        "tokens": layout.shard_tokens(index_shard),
        "doc_ids": layout.shard_doc_ids(index_shard),
    }
    logger.info(
        "add-docs: %d documents (%d chunks) checked in %.1fs",
        bucket.n_docs,
        shard.num_chunks,
        time.perf_counter() - t_start,
    )

    # 2. the new shard's files, each written (and hashed) by the task that makes it
    checksums: dict[str, str] = {}
    try:
        checksums["chunks"] = _write_chunks(config, manifest, shard, bucket.path, tokenizer_file, paths)
        checksums["embeddings"] = _write_embeddings(config, manifest, shard, paths)
        checksums.update(_fill_index(config, layout, manifest, paths))
    except BaseException:
        for path in paths.values():  # not in the manifest: nothing refers to them
            storage.delete(path, missing_ok=True)
        raise

    # 3. the manifest: the driver's only write
    manifest.splits.setdefault(ADDED, []).append(shard)
    manifest.index.shards.append(IndexShard.of(index_shard, shard))
    for name, path in paths.items():
        manifest.files[layout.relative(path)] = checksums[name]
    counts = manifest.counts
    counts.documents[ADDED] = counts.documents.get(ADDED, 0) + bucket.n_docs
    counts.chunks[ADDED] = counts.chunks.get(ADDED, 0) + shard.num_chunks
    manifest.revision = (manifest.revision or 0) + 1
    # the existing files' stats were checked when the database was opened: only the new files are asked for
    write_manifest(layout, manifest, known=dict(manifest.file_stats or {}))
    logger.info(
        "added %d documents (%d chunks) as index shard %d (%.1fs)",
        bucket.n_docs,
        shard.num_chunks,
        index_shard,
        time.perf_counter() - t_start,
    )
    return manifest


def _write_chunks(
    config: PlatformConfig,
    manifest: Manifest,
    shard: SplitShard,
    documents_file: str,
    tokenizer_file: str,
    paths: dict[str, Location],
) -> str:
    """The new chunk store, by the build's chunk-writing task -> its sha256."""
    call = {
        "documents_file": documents_file,
        "tokenizer_file": tokenizer_file,
        "chunk_len": manifest.chunk_len,
        "shard": {k: getattr(shard, k) for k in ("shard", "doc_start", "chunk_start", "chunk_end")},
        "out": str(paths["chunks"]),
        "row_group": rows_per_row_group(config, manifest),
    }
    (sha256,) = run_tasks("chunks.write", write_shard, [call], build_resources(config), num_cpus=0.5)
    return sha256


def _write_embeddings(
    config: PlatformConfig, manifest: Manifest, shard: SplitShard, paths: dict[str, Location]
) -> str:
    """The new shard's vectors, by the build's encoder actor pool -> their sha256."""
    t0 = time.perf_counter()
    item = {"chunks": str(paths["chunks"]), "out": str(paths["embeddings"])}
    (row,) = list(embed_shards(config, [item], encoder_settings(config, manifest)))
    if int(row["rows"]) != shard.num_chunks:
        raise RuntimeError(f"{item['out']}: {row['rows']} vectors for {shard.num_chunks} chunks")
    logger.info("add-docs: embedded %d chunks (%.1fs)", shard.num_chunks, time.perf_counter() - t0)
    return str(row["sha256"])


def _fill_index(
    config: PlatformConfig, layout: DatabaseLayout, manifest: Manifest, paths: dict[str, Location]
) -> dict[str, str]:
    """The new index shard (a copy of the trained index with the new vectors) and its token and doc-id
    arrays, by the build's fill task -> {index, tokens, doc_ids: sha256}."""
    index_cfg = config.database.index
    call = {
        "trained_file": str(layout.path(manifest.index.trained_file)),
        "embeddings_file": str(paths["embeddings"]),
        "chunks_file": str(paths["chunks"]),
        "outs": {name: str(paths[name]) for name in ("index", "tokens", "doc_ids")},
        "chunk_len": manifest.chunk_len,
        "add_block": index_cfg.add_block,
        "use_gpu": index_cfg.use_gpu,
        # graph indexes (HNSW) are order-dependent when filled on several threads
        "single_thread": index_cfg.deterministic_add and "HNSW" in manifest.index.factory,
    }
    gpus = 1.0 if index_cfg.use_gpu else 0.0
    (checksums,) = run_tasks(
        "index.fill", fill_task, [call], index_resources(config), num_cpus=1, num_gpus=gpus
    )
    return checksums
