"""`retro add-docs`: add documents to a built database as a new shard (the stage:
``retro_platform.db.add_docs``)."""

from __future__ import annotations

from retro_platform.config import PlatformConfig
from retro_platform.db.add_docs import ADDED, add_documents
from retro_platform.db.manifest import Manifest


def add_docs(config: PlatformConfig, files: list[str]) -> Manifest:
    """Add the documents of ``files`` (JSONL, Parquet, folders of .txt/.md) and print what was added ->
    the new manifest. A running ``retro serve`` reads the new shard from its next request (each request
    checks the manifest's revision); a pool held in a process starts serving it with
    ``NeighborPool.refresh``."""
    manifest = add_documents(config, files)
    shard = manifest.splits[ADDED][-1]
    print(
        f"database {config.db_path}: added {shard.doc_end - shard.doc_start} documents ({shard.num_chunks} chunks) as index "
        f"shard {manifest.index.shards[-1].shard}, revision {manifest.revision}"
    )
    return manifest
