"""Stage 1 of the build: the corpus -> validated, de-duplicated documents in hash buckets, streamed.

A map over the corpus's reader pieces (Ray Data, one task per piece, in parallel across the build
nodes) parses and validates each piece and writes its documents, split train/valid by a stable hash
of the id, into per-bucket files (the bucket is another stable hash of the id); a task per bucket
then gathers its files, checks ids are unique (equal ids share a bucket, so the check is local),
applies ``max_documents`` and writes the bucket's documents in corpus order (documents named in
``database.corpus.exclude_ids`` are checked like the others, then never kept nor counted). Nothing but
per-piece and per-bucket counts reaches the driver. Every file goes to the staging folder next to the
database: input refused at any point leaves the database folder untouched.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.build.sizing import corpus_bytes, derived_num_shards
from retro_platform.db.build.tasks import build_resources, run_tasks
from retro_platform.db.corpus import (
    MIRROR_SUFFIX,
    Piece,
    combine_digests,
    corpus_pieces,
    mirror_text,
    missing_exclusions,
    number_lines,
    parse_piece,
    piece_line_count,
    stable_split,
)
from retro_platform.db.embed import encoder_dimension
from retro_platform.db.files import read_table, write_table_atomic
from retro_platform.db.layout import SPLITS
from retro_platform.errors import CorpusError

logger = logging.getLogger(__name__)

STAGED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("where", pa.string()),
        ("piece", pa.int64()),
        ("row", pa.int64()),
        ("rank", pa.int64()),
        ("copy", pa.int8()),
    ]
)
"""A piece's documents in one bucket: ``row`` is the position in the piece, ``rank`` the position among
its non-empty documents that are kept (-1 for an empty or excluded one), ``copy`` 1 for the ``#mirror``
twin of a document."""

DOCUMENT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("title", pa.string())])
"""A bucket's documents, in corpus order (originals, then mirror copies)."""


def bucket_counts(config: PlatformConfig, pieces: list[Piece]) -> dict[str, int]:
    """Buckets (= chunk-store shards) of each split: ``num_shards`` (or, when null, what the actors'
    memory budget needs for this corpus) for train, a quarter of it for valid."""
    shards = config.database.num_shards
    if shards is None:
        dim = encoder_dimension(config.database.embed.model)
        shards = derived_num_shards(config, corpus_bytes(pieces), dim)
        logger.info(
            "database.num_shards: %d (pool.memory_gb_per_actor=%s, database.build_memory_gb=%s)",
            shards,
            config.pool.memory_gb_per_actor,
            config.database.build_memory_gb,
        )
    return {"train": shards, "valid": max(1, math.ceil(shards / 4))}


def bucket_of(doc_id: str, buckets: int) -> int:
    """The bucket of a document: a stable hash of its id (independent of the split's hash)."""
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[8:16], "big") % buckets


@dataclass
class Bucket:
    """One non-empty bucket of a split after collation."""

    split: str
    bucket: int
    n_docs: int
    path: str
    """Its documents file in the staging folder."""


@dataclass
class Documents:
    """What the documents stage found: the buckets, the corpus digest and the counts of the manifest."""

    buckets: dict[str, list[Bucket]]
    digest: str
    read: int
    empty: int

    def count(self, split: str) -> int:
        """Documents of a split."""
        return sum(b.n_docs for b in self.buckets[split])


def _staged_path(staging: str, split: str, bucket: int, piece: int | None = None) -> str:
    folder = storage.join(staging, "pieces", split, f"bucket-{bucket:04d}")
    return folder if piece is None else storage.join(folder, f"piece-{piece:06d}.parquet")


def documents_path(staging: str, split: str, bucket: int) -> str:
    """The collated documents of one bucket in the staging folder."""
    return storage.join(staging, "documents", split, f"bucket-{bucket:04d}.parquet")


def map_piece(
    piece: Piece,
    staging: str | None,
    buckets: dict[str, int],
    valid_fraction: float,
    mirror: bool,
    exclude: frozenset[str] = frozenset(),
    mirror_header_words: int = 0,
) -> dict[str, Any]:
    """Parse one piece and (unless ``staging`` is None) write its documents into bucket files (with
    ``mirror``, each also as its ``#mirror`` twin: ``mirror_text``) -> its counts, digest, the ids of ``exclude`` it held (left out of the database and of every count), and the
    first error (a value: Ray does not carry the exception's type back)."""
    try:
        docs, digest = parse_piece(piece)
    except CorpusError as exc:
        return {
            "piece": piece.index,
            "error": str(exc),
            "digest": "",
            "n_read": 0,
            "empty_before": [],
            "excluded": [],
        }
    rows: dict[tuple[str, int], dict[str, list]] = {}
    empty_before: list[int] = []  # for each empty document, the non-empty ones before it in the piece
    excluded: list[str] = []
    rank = 0
    for row, doc in enumerate(docs):
        # an excluded document is staged (so the bucket still checks its id is unique) with rank -1, which
        # the bucket never keeps, and is not counted: not as empty, not towards max_documents
        left_out = doc["id"] in exclude
        empty = not left_out and not doc["text"].strip()
        if left_out:
            excluded.append(doc["id"])
        elif empty:
            empty_before.append(rank)
        copies = [doc["id"]] + ([doc["id"] + MIRROR_SUFFIX] if mirror and not (empty or left_out) else [])
        for copy, doc_id in enumerate(copies):
            split = stable_split(doc_id, valid_fraction)
            key = (split, bucket_of(doc_id, buckets[split]))
            columns = rows.setdefault(key, {name: [] for name in STAGED_SCHEMA.names})
            for name, value in (
                ("id", doc_id),
                ("text", mirror_text(doc["id"], doc["text"], mirror_header_words) if copy else doc["text"]),
                ("title", doc["title"]),
                ("where", doc["where"]),
                ("piece", piece.index),
                ("row", row),
                ("rank", -1 if empty or left_out else rank),
                ("copy", copy),
            ):
                columns[name].append(value)
        rank += 0 if empty or left_out else 1
    if staging is not None:
        for (split, bucket), columns in rows.items():
            table = pa.Table.from_pydict(columns, schema=STAGED_SCHEMA)
            write_table_atomic(table, _staged_path(staging, split, bucket, piece.index))
    return {
        "piece": piece.index,
        "error": "",
        "digest": digest,
        "n_read": len(docs),
        "empty_before": empty_before,
        "excluded": excluded,
    }


def collate_bucket(staging: str, split: str, bucket: int, cuts: list[int] | None) -> dict[str, Any]:
    """Gather one bucket's staged documents, check their ids are unique, keep the non-empty ones within
    ``cuts`` (per piece: how many of its non-empty documents ``max_documents`` keeps; None: all) and write
    them in corpus order -> {n_docs, error, error_at} (error_at orders errors across buckets)."""
    folder = _staged_path(staging, split, bucket)
    files = [storage.join(folder, name) for name in storage.list_files(folder) if name.endswith(".parquet")]
    if not files:
        return {"split": split, "bucket": bucket, "n_docs": 0, "error": "", "error_at": []}
    table = pa.concat_tables([read_table(f).cast(STAGED_SCHEMA) for f in files])
    order = np.lexsort(
        (table.column("row").to_numpy(), table.column("piece").to_numpy(), table.column("copy").to_numpy())
    )
    table = table.take(order)
    ids = table.column("id").to_pylist()
    copies = table.column("copy").to_numpy()
    first_seen: dict[str, int] = {}
    for i, doc_id in enumerate(ids):
        if copies[i]:
            break  # mirror copies follow the originals; their ids are the originals' plus a suffix
        if doc_id in first_seen:
            where = table.column("where")
            return {
                "split": split,
                "bucket": bucket,
                "n_docs": 0,
                "error": f"{where[i]}: duplicate document id {doc_id!r} (first seen at "
                f"{where[first_seen[doc_id]]}); ids must be unique",
                "error_at": [int(table.column("piece")[i].as_py()), int(table.column("row")[i].as_py())],
            }
        first_seen[doc_id] = i
    ranks = table.column("rank").to_numpy()
    keep = ranks >= 0
    if cuts is not None:
        keep &= ranks < np.asarray(cuts, dtype=np.int64)[table.column("piece").to_numpy()]
    kept = table.filter(pa.array(keep)).select(DOCUMENT_SCHEMA.names)
    if kept.num_rows:
        write_table_atomic(kept.cast(DOCUMENT_SCHEMA), documents_path(staging, split, bucket))
    return {"split": split, "bucket": bucket, "n_docs": kept.num_rows, "error": "", "error_at": []}


def stage_documents(config: PlatformConfig, staging: str, pieces: list[Piece] | None = None) -> Documents:
    """Read, validate, split and bucket the corpus into ``staging`` -> the buckets and counts; raises
    CorpusError (first bad piece in corpus order) before the database folder is touched. ``pieces``
    (numbered 0, 1, ...) replaces the pieces of ``database.corpus.source`` (`retro add-docs`: its files)."""
    corpus = config.database.corpus
    resources = build_resources(config)
    if pieces is None:
        pieces = corpus_pieces(corpus.source, int(corpus.piece_mb * 1024**2))
    if any(p.kind == "jsonl" and p.start > 0 for p in pieces):  # a JSON Lines file in several pieces:
        # per-piece line counts, then offsets
        counts = run_tasks(
            "corpus.lines", piece_line_count, [{"piece": p} for p in pieces], resources, num_cpus=0.5
        )
        pieces = number_lines(pieces, counts)
    buckets = bucket_counts(config, pieces)
    exclude = frozenset(corpus.exclude_ids)

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        piece = pieces[row["piece"]]
        return map_piece(
            piece,
            staging,
            buckets,
            corpus.valid_fraction,
            corpus.mirror,
            exclude,
            corpus.mirror_header_words if corpus.mirror else 0,
        )

    items = [{"piece": p.index} for p in pieces]
    stats = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(parse, num_cpus=0.5, resources=resources)
        .take_all()
    )
    stats.sort(key=lambda r: r["piece"])
    errors = [r["error"] for r in stats if r["error"]]
    if errors:
        raise CorpusError(errors[0])
    missing_exclusions(corpus, {doc_id for r in stats for doc_id in r["excluded"]})
    read = sum(int(r["n_read"]) for r in stats)
    non_empty = [int(r["n_read"]) - len(r["excluded"]) - len(r["empty_before"]) for r in stats]
    cuts, empty = None, 0
    if corpus.max_documents is None:
        empty = sum(len(r["empty_before"]) for r in stats)
    else:
        cuts, left = [], corpus.max_documents
        for r, n in zip(stats, non_empty, strict=True):
            cuts.append(min(n, left))
            # an empty document counts when reading had not stopped yet: before the last kept document
            empty += sum(1 for before in r["empty_before"] if left > 0 and (before < cuts[-1] or left > n))
            left -= cuts[-1]
    if sum(non_empty) == 0:
        raise CorpusError(f"corpus {corpus.source} has no non-empty documents ({read} read, {empty} empty)")
    calls = [
        {"staging": staging, "split": split, "bucket": b, "cuts": cuts}
        for split in SPLITS
        for b in range(buckets[split])
    ]
    results = run_tasks("corpus.collate", collate_bucket, calls, resources, num_cpus=0.5)
    failed = sorted((r["error_at"], r["error"]) for r in results if r["error"])
    if failed:
        raise CorpusError(failed[0][1])
    found: dict[str, list[Bucket]] = {split: [] for split in SPLITS}
    for r in results:
        if r["n_docs"]:
            path = str(documents_path(staging, r["split"], r["bucket"]))
            found[r["split"]].append(Bucket(r["split"], r["bucket"], r["n_docs"], path))
    documents = Documents(found, combine_digests([r["digest"] for r in stats]), read, empty)
    if not documents.count("train"):
        raise CorpusError(
            f"corpus {corpus.source}: every document fell into the valid split; lower valid_fraction"
        )
    if empty:
        logger.warning("skipped %d empty documents", empty)
    logger.info(
        "corpus %s: %d documents read in %d pieces, %d train, %d valid, %d empty skipped",
        corpus.source,
        read,
        len(pieces),
        documents.count("train"),
        documents.count("valid"),
        empty,
    )
    return documents
