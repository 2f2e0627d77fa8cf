"""Stage 1 of the build: the corpus -> validated, de-duplicated documents in hash buckets, streamed.

A map over the corpus's reader pieces (Ray Data, one task per piece, in parallel across the build
nodes) parses and validates each piece and writes its documents, split train/valid by a stable hash
of the id, into one staged file per piece with a row group per bucket (the bucket is another stable
hash of the id); a task per bucket then reads its row group of every piece file, checks ids are unique
(equal ids share a bucket, so the check is local), applies ``max_documents`` and writes the bucket's
documents in corpus order, streaming a row group at a time (documents named in
``database.corpus.exclude_ids`` are checked like the others, then never kept nor counted). Nothing but
per-piece and per-bucket counts reaches the driver. Every file goes to the staging folder next to the
database: input refused at any point leaves the database folder untouched.

Resumable: each staged file records a fingerprint of what made it (the piece's files' size, mtime and
ETag, its place in them, and the settings that bucket and shape its documents) with the piece's counts.
The staging folder is kept when a build fails, so the next run reads no piece whose staged file is
current (it reuses the recorded counts), and re-collates no bucket whose inputs did not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.build.sizing import corpus_bytes, derived_num_shards
from retro_platform.db.build.tasks import build_resources, retrying, run_tasks
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
from retro_platform.db.files import parquet_file
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
    fingerprint: str = ""
    """What its documents were collated from (the pieces' fingerprints, the cuts): keys later caches."""


@dataclass
class Documents:
    """What the documents stage found: the buckets, the corpus digest and the counts of the manifest."""

    buckets: dict[str, list[Bucket]]
    digest: str
    read: int
    empty: int
    shards: int = 0
    """Train buckets (= ``database.num_shards``, or the count derived when it is null)."""
    parsed: list[int] = field(default_factory=list)
    """Pieces this run parsed (the others were current in the staging folder)."""

    def count(self, split: str) -> int:
        """Documents of a split."""
        return sum(b.n_docs for b in self.buckets[split])


# ---- staging: one file per piece, a row group per (split, bucket, copy) -------------------------------
STAGED_FORMAT = 2
"""Version of the staging layout (in every piece fingerprint): 1 was a file per piece and bucket."""

RECORD_KEY = b"retro.staged"
"""Parquet key-value metadata holding a staged file's record (fingerprint, counts)."""


def piece_file(staging: str, piece: int) -> str:
    """The staged documents of one corpus piece."""
    return storage.join(staging, "piece-files", f"piece-{piece:06d}.parquet")


def documents_path(staging: str, split: str, bucket: int) -> str:
    """The collated documents of one bucket in the staging folder."""
    return storage.join(staging, "buckets", split, f"bucket-{bucket:04d}.parquet")


def group_of(buckets: dict[str, int], split: str, bucket: int, copy: int) -> int:
    """Row group of a piece file holding the documents of (split, bucket) that are originals (copy 0)
    or mirror twins (copy 1): every file has one per (split, bucket, copy), empty ones included, in
    split, bucket, copy order."""
    offset = sum(buckets[s] for s in SPLITS[: SPLITS.index(split)])
    return 2 * (offset + bucket) + copy


def read_record(location: str) -> dict[str, Any] | None:
    """The record of a staged file (its footer only), or None when it is missing or unreadable."""
    try:
        if not storage.exists(location):
            return None
        metadata = parquet_file(location).metadata.metadata or {}
        return json.loads(metadata[RECORD_KEY]) if RECORD_KEY in metadata else None
    except (OSError, ValueError, KeyError, pa.ArrowInvalid):
        return None


def source_fingerprint(piece: Piece) -> str:
    """What a piece reads, as it is now: its place in its files and each file's size, mtime and ETag
    (``storage.file_info``: a stat, or one HEAD request per object)."""
    stats = [storage.file_info(path) for path in piece.paths]
    parts = [piece.kind, piece.root, list(piece.paths), piece.start, piece.end]
    parts.append([[st.size, st.mtime_ns or 0, st.etag] for st in stats])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def piece_fingerprint(source: str, piece: Piece, settings: dict[str, Any]) -> str:
    """The fingerprint of a piece's staged file: its source's, its line offset (errors name file lines)
    and the settings that place and shape its documents (buckets, split, mirror, exclusions)."""
    parts = {"format": STAGED_FORMAT, "source": source, "line_offset": piece.line_offset, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def staging_settings(config: PlatformConfig, buckets: dict[str, int]) -> dict[str, Any]:
    """The settings every piece fingerprint includes."""
    corpus = config.database.corpus
    exclude = hashlib.sha256("\0".join(sorted(corpus.exclude_ids)).encode()).hexdigest()
    return {
        "buckets": buckets,
        "valid_fraction": corpus.valid_fraction,
        "mirror": corpus.mirror,
        "mirror_header_words": corpus.mirror_header_words if corpus.mirror else 0,
        "exclude_ids": exclude,
    }


def current_lines(piece: Piece, staging: str | None) -> int:
    """Lines of a JSON Lines piece: the count its staged file recorded when the piece is unchanged
    since, else counted (``piece_line_count``)."""
    if staging is not None:
        record = read_record(piece_file(staging, piece.index))
        if record and record.get("source") == source_fingerprint(piece) and "lines" in record:
            return int(record["lines"])
    return piece_line_count(piece)


def staged_tables(
    staging: str, split: str, bucket: int, buckets: dict[str, int], columns=None, copy: int = 0
):
    """The staged documents of one (split, bucket) from every piece file, piece by piece (one row group
    each) -> iterator of tables in corpus order (originals with ``copy=0``, mirror twins with 1)."""
    folder = storage.join(staging, "piece-files")
    names = (
        sorted(n for n in storage.list_files(folder) if n.endswith(".parquet"))
        if storage.exists(folder)
        else []
    )
    group = group_of(buckets, split, bucket, copy)
    for name in names:
        file = parquet_file(storage.join(folder, name))
        if group < file.metadata.num_row_groups and file.metadata.row_group(group).num_rows:
            yield file.read_row_group(group, columns=columns)


def map_piece(
    piece: Piece,
    staging: str | None,
    buckets: dict[str, int],
    valid_fraction: float,
    mirror: bool,
    exclude: frozenset[str] = frozenset(),
    mirror_header_words: int = 0,
    settings: dict[str, Any] | None = None,
    lines: int | None = None,
) -> dict[str, Any]:
    """Parse one piece and (unless ``staging`` is None) write its documents into its staged file, a row
    group per (split, bucket, copy) (with ``mirror``, each document also as its ``#mirror`` twin:
    ``mirror_text``) -> its counts, digest, the ids of ``exclude`` it held (left out of the database and
    of every count), whether it was ``parsed``, and the first error (a value: Ray does not carry the
    exception's type back).

    With ``settings`` (``staging_settings``) the staged file records the piece's fingerprint, and a
    piece whose staged file already has the fingerprint it would get is not read again: its recorded
    counts are returned (a build resumed after a failure re-reads only the pieces it lost). ``lines``
    (the piece's line count, when the corpus needed it) is recorded for the next run."""
    fingerprint = source = ""
    if staging is not None and settings is not None:
        source = source_fingerprint(piece)
        fingerprint = piece_fingerprint(source, piece, settings)
        record = read_record(piece_file(staging, piece.index))
        if record and record.get("fingerprint") == fingerprint:
            return {
                **record["stats"],
                "piece": piece.index,
                "error": "",
                "parsed": False,
                "fingerprint": fingerprint,
            }
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
            "parsed": True,
            "fingerprint": fingerprint,
        }
    rows: dict[tuple[str, int, int], dict[str, list]] = {}
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
            key = (split, bucket_of(doc_id, buckets[split]), copy)
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
    stats = {"digest": digest, "n_read": len(docs), "empty_before": empty_before, "excluded": excluded}
    del docs
    if staging is not None:
        record = {"fingerprint": fingerprint, "source": source, "stats": stats}
        if lines is not None:
            record["lines"] = lines
        empty_table = STAGED_SCHEMA.empty_table()

        def write(handle) -> None:
            with pq.ParquetWriter(handle, STAGED_SCHEMA, compression="zstd") as writer:
                for split in SPLITS:
                    for bucket in range(buckets[split]):
                        for copy in (0, 1):
                            columns = rows.pop((split, bucket, copy), None)
                            table = (
                                empty_table
                                if columns is None
                                else pa.Table.from_pydict(columns, schema=STAGED_SCHEMA)
                            )
                            writer.write_table(table, row_group_size=max(1, table.num_rows))
                writer.add_key_value_metadata({RECORD_KEY: json.dumps(record)})

        storage.write_file_atomic(piece_file(staging, piece.index), write)
        pa.default_memory_pool().release_unused()
    return {**stats, "piece": piece.index, "error": "", "parsed": True, "fingerprint": fingerprint}


class _Duplicate(Exception):
    """Stops a collation's write: the bucket holds an id twice (reported by ``collate_bucket``)."""


def collate_bucket(
    staging: str,
    split: str,
    bucket: int,
    cuts: list[int] | None,
    buckets: dict[str, int] | None = None,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Gather one bucket's staged documents, check their ids are unique, keep the non-empty ones within
    ``cuts`` (per piece: how many of its non-empty documents ``max_documents`` keeps; None: all) and write
    them in corpus order (originals, then mirror twins) -> {n_docs, error, error_at} (error_at orders
    errors across buckets).

    Streams: one piece's row group at a time is read, filtered and appended to the output; the only
    state that grows with the bucket is an 8-byte hash per document id (the duplicate check). A bucket
    file that records ``fingerprint`` (what it was collated from) is current and not rewritten."""
    buckets = buckets or {split: bucket + 1}
    out = documents_path(staging, split, bucket)
    result = {
        "split": split,
        "bucket": bucket,
        "n_docs": 0,
        "error": "",
        "error_at": [],
        "fingerprint": fingerprint,
    }
    if fingerprint:
        record = read_record(out)
        if record and record.get("fingerprint") == fingerprint:
            return {**result, "n_docs": int(record["n_docs"])}
    cut_array = None if cuts is None else np.asarray(cuts, dtype=np.int64)
    hashes: list[np.ndarray] = []
    kept = 0

    def write(handle) -> None:
        nonlocal kept
        with pq.ParquetWriter(handle, DOCUMENT_SCHEMA, compression="zstd") as writer:
            for copy in (0, 1):
                for table in staged_tables(staging, split, bucket, buckets, copy=copy):
                    table = table.cast(STAGED_SCHEMA)
                    if copy == 0:
                        hashes.append(_id_hashes(table.column("id")))
                    ranks = table.column("rank").to_numpy()
                    keep = ranks >= 0
                    if cut_array is not None:
                        keep &= ranks < cut_array[table.column("piece").to_numpy()]
                    table = table.filter(pa.array(keep)).select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA)
                    if table.num_rows:
                        writer.write_table(table)
                        kept += table.num_rows
                if copy == 0 and _first_duplicate(hashes) is not None:
                    raise _Duplicate  # nothing is published
            if not kept:
                raise _Empty
            writer.add_key_value_metadata(
                {RECORD_KEY: json.dumps({"fingerprint": fingerprint, "n_docs": kept})}
            )

    try:
        storage.write_file_atomic(out, write)
    except _Empty:
        storage.delete(out)  # an older version, if any, no longer holds this bucket's documents
    except _Duplicate:
        return {**result, **_duplicate_error(staging, split, bucket, buckets, _first_duplicate(hashes))}
    finally:
        pa.default_memory_pool().release_unused()
    return {**result, "n_docs": kept}


class _Empty(Exception):
    """Stops a collation's write: the bucket keeps no document (no file is written)."""


def _id_hashes(ids: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of every id (xxhash-free: the first 8 bytes of its sha1), as uint64."""
    return np.fromiter(
        (int.from_bytes(hashlib.sha1(i.encode("utf-8")).digest()[:8], "big") for i in ids.to_pylist()),
        dtype=np.uint64,
        count=len(ids),
    )


def _first_duplicate(hashes: list[np.ndarray]) -> tuple[int, int] | None:
    """(position of the first id seen before, position of its first sighting) in collation order, or
    None; positions count the bucket's staged originals (kept or not)."""
    if not hashes:
        return None
    values = np.concatenate(hashes)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    repeated = np.flatnonzero(first[inverse] != np.arange(len(values)))
    if not len(repeated):
        return None
    i = int(repeated[0])
    return i, int(first[inverse[i]])


def _duplicate_error(
    staging: str, split: str, bucket: int, buckets: dict[str, int], positions: tuple[int, int]
) -> dict[str, Any]:
    """The error of a bucket whose staged originals hold an id twice (rows ``positions``: the repeat,
    the first): a second pass reads the two rows' ids and places."""
    wanted = {positions[0]: None, positions[1]: None}
    offset = 0
    for table in staged_tables(staging, split, bucket, buckets, columns=["id", "where", "piece", "row"]):
        for position in wanted:
            if offset <= position < offset + table.num_rows:
                wanted[position] = table.slice(position - offset, 1).to_pylist()[0]
        offset += table.num_rows
    repeat, first = wanted[positions[0]], wanted[positions[1]]
    if repeat["id"] != first["id"]:  # two ids with one 64-bit hash: astronomically rare, never silent
        raise RuntimeError(f"bucket {split}/{bucket}: ids {repeat['id']!r} and {first['id']!r} share a hash")
    return {
        "error": f"{repeat['where']}: duplicate document id {repeat['id']!r} (first seen at "
        f"{first['where']}); ids must be unique",
        "error_at": [int(repeat["piece"]), int(repeat["row"])],
    }


def stage_documents(config: PlatformConfig, staging: str, pieces: list[Piece] | None = None) -> Documents:
    """Read, validate, split and bucket the corpus into ``staging`` -> the buckets and counts; raises
    CorpusError (first bad piece in corpus order) before the database folder is touched. ``pieces``
    (numbered 0, 1, ...) replaces the pieces of ``database.corpus.source`` (`retro add-docs`: its files)."""
    corpus = config.database.corpus
    resources = build_resources(config)
    if pieces is None:
        pieces = corpus_pieces(corpus.source, int(corpus.piece_mb * 1024**2))
    lines: list[int | None] = [None] * len(pieces)
    if any(p.kind == "jsonl" and p.start > 0 for p in pieces):  # a JSON Lines file in several pieces:
        # per-piece line counts (recorded by an earlier run's staged file when the piece is unchanged),
        # then offsets
        lines = run_tasks(
            "corpus.lines",
            current_lines,
            [{"piece": p, "staging": staging} for p in pieces],
            resources,
            num_cpus=0.5,
        )
        pieces = number_lines(pieces, lines)
    buckets = bucket_counts(config, pieces)
    exclude = frozenset(corpus.exclude_ids)
    settings = staging_settings(config, buckets)

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
            settings=settings,
            lines=lines[row["piece"]],
        )

    items = [{"piece": p.index} for p in pieces]
    stats = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(retrying(parse, in_place=True), num_cpus=0.5, resources=resources)
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
    parsed = [int(r["piece"]) for r in stats if r["parsed"]]
    logger.info(
        "corpus: %d of %d pieces parsed, %d current in the staging folder",
        len(parsed),
        len(stats),
        len(stats) - len(parsed),
    )
    collated_from = hashlib.sha256(
        json.dumps([settings, cuts, [r["fingerprint"] for r in stats]]).encode()
    ).hexdigest()
    calls = [
        {
            "staging": staging,
            "split": split,
            "bucket": b,
            "cuts": cuts,
            "buckets": buckets,
            "fingerprint": hashlib.sha256(f"{collated_from}/{split}/{b}".encode()).hexdigest(),
        }
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
            found[r["split"]].append(Bucket(r["split"], r["bucket"], r["n_docs"], path, r["fingerprint"]))
    documents = Documents(
        found, combine_digests([r["digest"] for r in stats]), read, empty, buckets["train"], parsed
    )
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
