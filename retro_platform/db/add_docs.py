"""`retro add-docs`: add documents to a built database (a new shard) and to a running pool.

New documents are validated like a corpus (and against the ids already in the database), chunked with
the database's own tokenizer, embedded with its own encoder, added to a copy of the trained index, and
written as a new shard (new doc and chunk ids after every existing one). The manifest, with checksums of
the new files, is replaced atomically at the end, so an interrupted add leaves the database as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retro_platform.config import PlatformConfig
from retro_platform.db.chunk import (
    chunk_documents,
    read_chunks,
    tokens_array,
)
from retro_platform.db.corpus import read_documents
from retro_platform.db.embed import Embedder
from retro_platform.db.files import read_index, save_npy_atomic, write_index_atomic, write_table_atomic
from retro_platform.db.index import fill_index
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import IndexShard, Manifest, SplitShard, validate_database, write_manifest
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.errors import CorpusError
from retro_platform.ray_utils import ray_session
from retro_platform.serve.pool import NeighborPool

logger = logging.getLogger(__name__)

ADDED = "added"
"""Split name of documents added after the build."""


def _existing_doc_keys(layout: DatabaseLayout, manifest: Manifest) -> set[str]:
    keys: set[str] = set()
    for split, shards in manifest.splits.items():
        for s in shards:
            keys.update(read_chunks(layout.chunks(split, s.shard), ["doc_key"]).column("doc_key").to_pylist())
    return keys


def add_documents(config: PlatformConfig, files: list[str], pool: NeighborPool | None = None) -> Manifest:
    """Add the documents of ``files`` as a new shard; a given ``pool`` starts serving it at once -> the
    database's new manifest."""
    with ray_session(config):
        manifest = validate_database(config.db_path)
        layout = DatabaseLayout(config.db_path)
        docs = [doc for f in files for doc in read_documents(str(Path(f).expanduser()), use_ray=False)]
        docs = [d for d in docs if d["text"].strip()]
        if not docs:
            raise CorpusError(f"{', '.join(files)}: no non-empty documents to add")
        existing = _existing_doc_keys(layout, manifest)
        seen: set[str] = set()
        for doc in docs:
            if doc["id"] in existing or doc["id"] in seen:
                raise CorpusError(f"document id {doc['id']!r} is already in the database (or given twice)")
            seen.add(doc["id"])
        tokenizer = load_tokenizer_file(layout.tokenizer)
        all_shards = [s for shards in manifest.splits.values() for s in shards]
        doc_start = max(s.doc_end for s in all_shards)
        chunk_start = max(s.chunk_end for s in all_shards)
        added = manifest.splits.setdefault(ADDED, [])
        split_shard = len(added)
        index_shard = len(manifest.index.shards)
        table = chunk_documents(docs, tokenizer, manifest.chunk_len, doc_start, chunk_start)
        # the database's own encoder settings (weights dtype, batch size, stored dtype)
        vectors = Embedder.from_manifest(manifest).encode(table.column("text").to_pylist())
        trained = read_index(layout.path(manifest.index.trained_file))
        index = fill_index(trained, vectors, config.database.index.add_block)
        paths = {
            "chunks": layout.chunks(ADDED, split_shard),
            "embeddings": layout.embeddings(ADDED, split_shard),
            "index": layout.index(index_shard),
            "tokens": layout.shard_tokens(index_shard),
            "doc_ids": layout.shard_doc_ids(index_shard),
        }
        checksums = {
            "chunks": write_table_atomic(table, paths["chunks"]),
            "embeddings": save_npy_atomic(vectors, paths["embeddings"]),
            "index": write_index_atomic(index, paths["index"]),
            "tokens": save_npy_atomic(tokens_array(table, manifest.chunk_len), paths["tokens"]),
            "doc_ids": save_npy_atomic(table.column("doc_id").to_numpy().astype(np.int64), paths["doc_ids"]),
        }
        n = table.num_rows
        shard = SplitShard(
            shard=split_shard,
            split=ADDED,
            doc_start=doc_start,
            doc_end=doc_start + len(docs),
            chunk_start=chunk_start,
            chunk_end=chunk_start + n,
        )
        added.append(shard)
        manifest.index.shards.append(IndexShard.of(index_shard, shard))
        for name, path in paths.items():
            manifest.files[layout.relative(path)] = checksums[name]
        counts = manifest.counts
        counts.documents[ADDED] = counts.documents.get(ADDED, 0) + len(docs)
        counts.chunks[ADDED] = counts.chunks.get(ADDED, 0) + n
        manifest.revision = (manifest.revision or 0) + 1
        write_manifest(layout, manifest)
        logger.info("added %d documents (%d chunks) as index shard %d", len(docs), n, index_shard)
        if pool is not None:
            pool.refresh(config, manifest)
        return manifest
