"""The database build (`retro build-db`, in ``retro_platform.commands.build_db``): corpus -> documents -> tokenizer -> chunk store -> embeddings -> index shards -> manifest.

The build is a streaming pipeline on Ray: every stage's data is read and written by Ray Data tasks,
Ray tasks and encoder actors on the build's nodes, and the driver only plans, records checksums and
writes the manifest. One module per stage (``documents``, ``chunks``, ``embeddings``, ``indexing``),
the bookkeeping in ``ledger``, the order of the stages in ``pipeline``.

Idempotent and resumable: every output file is written to a temporary name and renamed, and the
manifest records, for each file, its sha256 and the sha256 of the files it was made from. The manifest
is rewritten (``status: building``) as files are written (at most every 5 s), so a re-run after an interruption or a
deleted/corrupt file skips each output that is still current and rebuilds only the rest,
byte-identical to an uninterrupted build. The staging folder next to the database (one staged file
per corpus piece, the collated buckets, their chunk counts; each records a fingerprint of what made
it) is kept when a build fails, so the re-run reads no corpus piece and tokenizes no bucket whose
staged output is current; it is removed when the build completes.

Memory is bounded by a block, not a shard: every stage streams through its shard a Parquet row group
or an .npy row block at a time (``streams``); the index being filled is the only per-shard state a
build worker holds, which ``database.build_memory_gb`` bounds when ``database.num_shards`` is null
(``sizing``). Build tasks are re-run after a transient OSError (``tasks``).
"""

from retro_platform.db.build.pipeline import Build

__all__ = ["Build"]
