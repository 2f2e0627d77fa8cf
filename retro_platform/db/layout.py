"""The on-disk layout of a retrieval database: one place that names every file.

A database is a folder::

    manifest.json                        what was built, from what, with checksums of every file
    tokenizer.json                       the project tokenizer (HF tokenizers format)
    chunks/<split>/shard-XXXX.parquet    chunk store, split in {train, valid}
    chunks/<split>/shard-XXXX.tokens.npy   int32 [n_chunks, chunk_len] of a chunk-store shard (optional;
    chunks/<split>/shard-XXXX.doc_ids.npy  int64 [n_chunks]            readers fall back to index/ arrays)
    embeddings/<split>/shard-XXXX.npy    float16/float32 [n_chunks, dim], row i = chunk_start + i
    index/trained.faiss                  the trained, empty index (manifest index.trained_file); add-docs clones it
    index/shard-XXXX.faiss               FAISS index of one index shard; FAISS id = chunk_id - chunk_start
    index/shard-XXXX.tokens.npy          int32 [n_chunks, chunk_len], memory-mappable, pad-filled
    index/shard-XXXX.doc_ids.npy         int64 [n_chunks], the doc_id of every chunk of the shard
    neighbors/<split>/shard-XXXX.parquet precomputed neighbour table of a chunk-store shard (chunk_id ->
                                         k neighbour chunk ids), sorted by chunk id, small row groups
    neighbors/<split>.parquet            the same for a whole split (written before per-shard tables)

Identifiers. ``doc_id`` is a global int64 document index and ``chunk_id`` a global int64 chunk index,
both contiguous and in document order over the whole database: the train split's shards first (shard 0,
1, ...), then the valid split's shards, then documents added later by ``retro add-docs`` (which go into
new shards). Every shard is a contiguous range of documents, so a chunk and its continuation (the next
chunk of the same document) always live in the same shard. The original document id from the corpus is
kept as ``doc_key`` (string).

Chunk store columns: chunk_id int64, doc_id int64, doc_key string, position int32 (chunk index within
its document), tokens list<int32> (exactly chunk_len, padded with the tokenizer's pad id),
n_tokens int32 (real tokens, <= chunk_len), text string (the decoded chunk text). Row groups hold
``database.embed.rows_per_task`` rows (the unit of one embedding task of the build).
"""

from __future__ import annotations

from pathlib import Path

from retro_platform import storage

SPLITS = ("train", "valid")
"""Document splits of a database."""

FORMAT_VERSION = 1
"""Bumped when the layout changes incompatibly; later stages refuse other versions."""


Location = Path | str
"""Where a database file lives: a Path for a local/NFS database, an ``s3://`` URI string otherwise."""


class DatabaseLayout:
    """Locations of every file of the database rooted at ``root`` (a local path or an ``s3://`` URI).

    For a local database every location is an absolute ``Path``; for a remote one a URI string. Read and
    write them through ``retro_platform.db.files`` / ``retro_platform.storage``, which take both."""

    def __init__(self, root: str | Path):
        self.remote = storage.is_remote(str(root))
        self.root: Location = str(root).rstrip("/") if self.remote else Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"DatabaseLayout({str(self.root)!r})"

    def path(self, relative: str) -> Location:
        """The location of a file given relative to the root (as the manifest names it)."""
        return storage.join(self.root, relative) if self.remote else self.root / relative

    @property
    def manifest(self) -> Location:
        """manifest.json."""
        return self.path("manifest.json")

    @property
    def tokenizer(self) -> Location:
        """tokenizer.json."""
        return self.path("tokenizer.json")

    def chunks(self, split: str, shard: int) -> Location:
        """Parquet chunk store of one shard of a split."""
        return self.path(f"chunks/{split}/shard-{shard:04d}.parquet")

    def embeddings(self, split: str, shard: int) -> Location:
        """Embeddings (.npy) of one shard of a split, row-aligned with its chunk store."""
        return self.path(f"embeddings/{split}/shard-{shard:04d}.npy")

    def index(self, shard: int) -> Location:
        """FAISS index of one index shard."""
        return self.path(f"index/shard-{shard:04d}.faiss")

    def shard_tokens(self, shard: int) -> Location:
        """Memory-mappable chunk tokens of one index shard."""
        return self.path(f"index/shard-{shard:04d}.tokens.npy")

    def shard_doc_ids(self, shard: int) -> Location:
        """doc_id of every chunk of one index shard."""
        return self.path(f"index/shard-{shard:04d}.doc_ids.npy")

    def neighbors(self, split: str) -> Location:
        """Precomputed neighbour table of a whole split (the form before per-shard tables)."""
        return self.path(f"neighbors/{split}.parquet")

    def neighbors_dir(self, split: str) -> Location:
        """Folder of a split's per-shard precomputed neighbour tables."""
        return self.path(f"neighbors/{split}")

    def neighbor_shard(self, split: str, shard: int) -> Location:
        """Precomputed neighbour table of one chunk-store shard of a split."""
        return self.path(f"neighbors/{split}/shard-{shard:04d}.parquet")

    def chunk_tokens(self, split: str, shard: int) -> Location:
        """Memory-mappable tokens of one chunk-store shard (int32 [n, chunk_len], pad-filled)."""
        return self.path(f"chunks/{split}/shard-{shard:04d}.tokens.npy")

    def chunk_doc_ids(self, split: str, shard: int) -> Location:
        """doc_id of every chunk of one chunk-store shard (int64 [n])."""
        return self.path(f"chunks/{split}/shard-{shard:04d}.doc_ids.npy")

    def staging(self, command: str) -> str:
        """Where a command (``build``, ``add-docs``) keeps its intermediate files: ``.<name>.<command>``
        next to the database, never inside it, so input refused half-way leaves the database untouched."""
        root = str(self.root)
        return storage.join(storage.parent(root), f".{storage.basename(root)}.{command}")

    def relative(self, location: Location) -> str:
        """Location relative to the database root (the form stored in the manifest)."""
        if self.remote:
            text = str(location)
            if not text.startswith(self.root + "/"):
                raise ValueError(f"{text} is not inside the database {self.root}")
            return text[len(self.root) + 1 :]
        return str(Path(location).resolve().relative_to(self.root))
