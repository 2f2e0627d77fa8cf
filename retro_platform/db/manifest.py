"""The database manifest: what was built, from what, and a checksum of every file.

``manifest.json`` is read into a typed ``Manifest`` (the dataclasses below) by ``load_manifest``, which
refuses a missing key, a value of the wrong type or an unknown key, naming the file and the key;
``Manifest.to_dict`` gives back exactly the JSON it was read from. The writers (`retro build-db`,
`retro add-docs`, `retro query-neighbors`) change a ``Manifest`` in place and ``write_manifest`` it.

Later stages call ``validate_database`` before reading a database: it refuses a missing, partial or
corrupt database (naming the file) and one built with a different tokenizer, encoder or chunk length
than the caller expects.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retro_platform import storage, typed
from retro_platform.db.files import file_sha256, write_json_atomic
from retro_platform.db.layout import FORMAT_VERSION, DatabaseLayout
from retro_platform.errors import DatabaseError
from retro_platform.storage import FileStat

# In every dataclass below a field that defaults to None is a key the JSON may lack (None = absent, never
# written); every other field is a key the JSON must have.


@dataclass
class TokenizerInfo:
    """The database's tokenizer (``manifest.tokenizer``)."""

    file: str
    """Its file, relative to the database root (``tokenizer.json``)."""
    sha256: str
    """Checksum of the file; checkpoints record it so a model is never used with another tokenizer."""
    vocab_size: int
    """Tokens in the vocabulary (the model's vocab_size)."""
    pad_id: int
    """Id that pads chunks (the model's pad_id)."""
    eod_id: int
    """Id that ends every document."""


@dataclass
class EncoderInfo:
    """The sentence encoder that embedded the chunks (``manifest.encoder``)."""

    name: str
    """``database.embed.model`` of the build."""
    path: str
    """Local folder the encoder was loaded from."""
    dim: int
    """Embedding dimension."""
    dtype: str
    """dtype the embeddings are stored in."""
    normalized: bool
    """Embeddings have unit length (inner product = cosine)."""
    compute_dtype: str | None = None
    """dtype of the encoder's weights (absent in databases built before it was recorded: ``auto``)."""
    batch_size: int | None = None
    """Texts per encode call (absent in databases built before it was recorded: 64)."""


@dataclass
class SplitShard:
    """One chunk-store shard of a split (``manifest.splits[split][i]``): ranges are [start, end)."""

    shard: int
    """Shard number within its split (``chunks/<split>/shard-XXXX.parquet``)."""
    split: str
    """``train``, ``valid`` or ``added`` (documents from `retro add-docs`)."""
    doc_start: int
    """First document id."""
    doc_end: int
    """One past the last document id."""
    chunk_start: int
    """First chunk id."""
    chunk_end: int
    """One past the last chunk id."""

    @property
    def num_chunks(self) -> int:
        """Chunks in the shard."""
        return self.chunk_end - self.chunk_start


@dataclass
class IndexShard:
    """One FAISS index shard (``manifest.index.shards[i]``): the vectors of one chunk-store shard."""

    shard: int
    """Index shard number (``index/shard-XXXX.faiss``); one neighbour-pool actor per shard."""
    split: str
    """Split of the chunk-store shard it indexes."""
    split_shard: int
    """Number of that chunk-store shard within its split."""
    chunk_start: int
    """First chunk id (FAISS id = chunk id - chunk_start)."""
    chunk_end: int
    """One past the last chunk id."""
    doc_start: int
    """First document id."""
    doc_end: int
    """One past the last document id."""
    n_vectors: int
    """Vectors in the shard."""

    @classmethod
    def of(cls, shard: int, source: SplitShard) -> IndexShard:
        """Index shard number ``shard`` over the chunk-store shard ``source``."""
        return cls(
            shard=shard,
            split=source.split,
            split_shard=source.shard,
            chunk_start=source.chunk_start,
            chunk_end=source.chunk_end,
            doc_start=source.doc_start,
            doc_end=source.doc_end,
            n_vectors=source.num_chunks,
        )


@dataclass
class IndexInfo:
    """The FAISS index (``manifest.index``)."""

    factory: str
    """FAISS factory string built (``auto`` resolved)."""
    requested: str
    """``database.index.factory`` as configured."""
    metric: str
    """Similarity (``inner_product``)."""
    includes_valid: bool
    """The valid split is indexed too."""
    trained_file: str
    """The trained, empty index, relative to the root (`retro add-docs` clones it)."""
    shards: list[IndexShard]
    """Every index shard, in shard order."""

    @property
    def num_vectors(self) -> int:
        """Vectors over every shard: the chunks a query can retrieve."""
        return sum(s.n_vectors for s in self.shards)


@dataclass
class Counts:
    """What the database holds (``manifest.counts``)."""

    documents_read: int
    """Documents read from the corpus."""
    documents_empty: int
    """Empty documents skipped."""
    documents: dict[str, int]
    """Documents per split."""
    chunks: dict[str, int]
    """Chunks per split."""
    tokens: int
    """Real (non-padding) tokens of the built splits."""
    padding_fraction: float
    """Share of the chunk store's token slots that are padding."""


@dataclass
class NeighborTable:
    """A precomputed neighbour table (``manifest.neighbors[split]``, from `retro query-neighbors`)."""

    file: str
    """Relative to the root: the folder of the per-shard tables (``neighbors/<split>``) when
    ``shard_files`` is set, else the split's single Parquet table (databases before per-shard tables)."""
    candidates: int
    """Neighbours kept per chunk (num_neighbors x search_depth)."""
    shard_files: list[str] | None = None
    """One table per chunk-store shard of the split, in shard order, relative to the root (absent in
    databases whose table is the single file ``file``)."""


@dataclass
class Manifest:
    """``manifest.json``: what was built, from what, and the sha256 of every file.

    A build in progress (``status`` ``building``) records only its progress (format version, status,
    fingerprint, files, inputs) and whatever the manifest it resumes from had: the sections from
    ``db_id`` on are None there. ``load_manifest`` refuses a ``complete`` manifest that lacks one, so
    every manifest ``validate_database`` returns has them all (``revision`` apart).
    """

    format_version: int
    """Layout version (``FORMAT_VERSION``); other versions are refused."""
    status: str
    """``complete``, or ``building`` while a build runs or after one was interrupted."""
    fingerprint: str
    """Hash of every setting that changes the database's bytes (a rebuild with others is refused)."""
    files: dict[str, str]
    """Relative path -> sha256 of every file of the database."""
    fingerprint_inputs: dict[str, Any] | None = None
    """The settings hashed into ``fingerprint`` (to name a changed one); absent in early databases."""
    inputs: dict[str, dict[str, str]] | None = None
    """Relative path -> {relative path of each file it was made from: its sha256 then}; absent in early
    databases."""
    file_stats: dict[str, FileStat] | None = dataclasses.field(default=None, compare=False)
    """Relative path -> size and modification time of every file of ``files`` when the manifest was
    written (``write_manifest``): the quick check compares these and hashes only files whose
    modification time changed; absent in databases written before it existed. Not part of a
    manifest's equality (two builds of the same bytes are equal whenever their files were written)."""
    db_id: str | None = None
    """Hash of ``files``: equal ids mean equal databases."""
    config: dict[str, Any] | None = None
    """The ``database`` config section of the build."""
    chunk_len: int | None = None
    """Tokens per chunk."""
    tokenizer: TokenizerInfo | None = None
    """The tokenizer."""
    encoder: EncoderInfo | None = None
    """The sentence encoder."""
    counts: Counts | None = None
    """Documents, chunks and tokens."""
    splits: dict[str, list[SplitShard]] | None = None
    """Split -> its chunk-store shards, in chunk order (``added`` after `retro add-docs`)."""
    index: IndexInfo | None = None
    """The FAISS index and its shards."""
    neighbors: dict[str, NeighborTable] | None = None
    """Split -> its precomputed neighbour table (empty until `retro query-neighbors`)."""
    revision: int | None = None
    """Times `retro add-docs` changed the database (absent before the first)."""

    COMPLETE_SECTIONS: typing.ClassVar[tuple[str, ...]] = (
        "db_id",
        "config",
        "chunk_len",
        "tokenizer",
        "encoder",
        "counts",
        "splits",
        "index",
        "neighbors",
    )
    """Sections every ``complete`` manifest has."""

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = "manifest.json") -> Manifest:
        """Check and convert parsed JSON; DatabaseError naming ``source`` and the key when a key is
        missing, unknown or of the wrong type."""
        try:
            manifest = typed.load(cls, values)
        except typed.WrongType as exc:
            expected = "an object" if exc.expected == "a mapping" else exc.expected
            shown = repr(exc.value) if len(repr(exc.value)) <= 60 else repr(exc.value)[:57] + "..."
            raise DatabaseError(
                f"{source}: {exc.where() or 'the manifest'} should be {expected}, not {shown}; {_REBUILD}"
            ) from None
        except typed.UnknownKeys as exc:
            raise DatabaseError(
                f"{source} has unknown key {exc.unknown[0]} (written by another version?); {_REBUILD}"
            ) from None
        except typed.MissingKey as exc:
            raise DatabaseError(f"{source} lacks {exc.where()}; {_REBUILD}") from None
        for relative, stat in (manifest.file_stats or {}).items():
            if stat.sha256 is None:  # storage.FileStat's sha256 is optional; a recorded stat has one
                raise DatabaseError(f"{source} lacks file_stats[{relative}].sha256; {_REBUILD}")
        if manifest.status == "complete":
            for name in cls.COMPLETE_SECTIONS:
                if getattr(manifest, name) is None:
                    raise DatabaseError(f"{source} lacks {name}; {_REBUILD}")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a deep copy): what ``from_dict`` reads back, without the absent (None) keys."""
        return _to_json(self)


_REBUILD = "run `retro build-db` to rebuild the database"


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


EXPECTABLE: dict[str, Callable[[Manifest], Any]] = {
    "chunk_len": lambda m: m.chunk_len,
    "tokenizer_sha256": lambda m: m.tokenizer.sha256,
    "encoder": lambda m: m.encoder.name,
    "vocab_size": lambda m: m.tokenizer.vocab_size,
    "dim": lambda m: m.encoder.dim,
    "pad_id": lambda m: m.tokenizer.pad_id,
}
"""What a later stage can require of a database (``validate_database(expect=...)``)."""


def write_manifest(
    layout: DatabaseLayout, manifest: Manifest, known: dict[str, FileStat] | None = None
) -> None:
    """Write manifest.json atomically, with ``file_stats`` set to the current size and modification time
    of every file of ``manifest.files`` that exists; ``known`` stats (taken by the caller when it wrote
    or checked a file, for the checksum recorded now) are used as they are, without asking storage."""
    stats = {}
    for relative in sorted(manifest.files):
        checksum = manifest.files[relative]
        if known and relative in known and known[relative].sha256 == checksum:
            stats[relative] = known[relative]
            continue
        stat = file_stat(layout.path(relative), checksum)
        if stat is not None:
            stats[relative] = stat
    manifest.file_stats = stats
    write_json_atomic(manifest.to_dict(), layout.manifest)


def file_stat(location: str | Path, checksum: str) -> FileStat | None:
    """The FileStat of a file as it is now, recorded with ``checksum`` (None when it is missing)."""
    try:
        info = storage.file_info(location)
    except FileNotFoundError:
        return None
    return FileStat(size=info.size, mtime_ns=info.mtime_ns or 0, etag=info.etag, sha256=checksum)


def load_manifest(db_path: str | Path) -> Manifest:
    """Read a database's manifest (complete or partial), refusing a missing, unreadable or malformed one
    with a clear message."""
    layout = DatabaseLayout(db_path)
    if not storage.exists(layout.manifest):
        if not storage.exists(layout.root) and not storage.list_files(layout.root):
            raise DatabaseError(f"database {layout.root} does not exist; build it with `retro build-db`")
        raise DatabaseError(
            f"{layout.manifest} is missing: {layout.root} is not a (complete) database; run `retro build-db`"
        )
    try:
        values = json.loads(storage.read_bytes(layout.manifest).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatabaseError(
            f"{layout.manifest} is corrupt ({exc}); run `retro build-db` to repair it"
        ) from None
    if not isinstance(values, dict):
        raise DatabaseError(
            f"{layout.manifest} is corrupt (not a JSON object); run `retro build-db` to repair it"
        )
    if values.get("format_version") != FORMAT_VERSION:
        raise DatabaseError(
            f"{layout.manifest} has format version {values.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; rebuild the database"
        )
    return Manifest.from_dict(values, layout.manifest)


def validate_database(
    db_path: str | Path,
    expect: dict[str, Any] | None = None,
    check_files: str | bool = "quick",
) -> Manifest:
    """Load and check a database -> its (complete) manifest.

    ``expect`` may name any of ``EXPECTABLE`` (``chunk_len``, ``tokenizer_sha256``, ``encoder``,
    ``vocab_size``, ``dim``, ``pad_id``): a mismatch raises DatabaseError saying which; an unknown key
    is a ValueError (a typo must not pass silently). ``check_files`` checks every file, naming the first
    missing or different one: "quick" (the default, when a stage starts) its size, and its sha256 only
    when its modification time differs from the one recorded (or none was); "full" (``retro verify-db``)
    its sha256 always; False not at all.
    """
    layout = DatabaseLayout(db_path)
    manifest = load_manifest(db_path)
    if manifest.status != "complete":
        raise DatabaseError(
            f"database {layout.root} is only partly built ({layout.manifest} has status "
            f"{manifest.status!r}); run `retro build-db` to finish it"
        )
    unknown = sorted(set(expect or {}) - set(EXPECTABLE))
    if unknown:
        raise ValueError(f"validate_database: unknown expectation(s) {unknown}; known: {list(EXPECTABLE)}")
    for key, value in (expect or {}).items():
        actual = EXPECTABLE[key](manifest)
        if actual != value:
            raise DatabaseError(
                f"database {layout.root} was built with {key}={actual!r} but {value!r} is expected; "
                "use the database this model was trained on, or rebuild/retrain so they match"
            )
    if check_files not in ("quick", "full", False):
        raise ValueError(
            f"validate_database: check_files must be 'quick', 'full' or False, got {check_files!r}"
        )
    if check_files:
        stats = manifest.file_stats or {}
        for relative, checksum in manifest.files.items():
            path = layout.path(relative)
            if not storage.exists(path):
                raise DatabaseError(f"database file {path} is missing; run `retro build-db` to rebuild it")
            recorded = stats.get(relative)
            if check_files == "quick" and recorded is not None and recorded.sha256 == checksum:
                info = storage.file_info(path)
                if info.size != recorded.size:
                    raise DatabaseError(
                        f"database file {path} does not match its checksum: it has {info.size} bytes, "
                        f"{recorded.size} were written (truncated or modified); run `retro build-db` to rebuild it"
                    )
                if recorded.same_version(info):
                    continue  # unchanged since it was recorded: `retro verify-db` hashes it anyway
            if file_sha256(path) != checksum:
                raise DatabaseError(
                    f"database file {path} does not match its checksum (corrupt or modified); "
                    "run `retro build-db` to rebuild it"
                )
    return manifest
