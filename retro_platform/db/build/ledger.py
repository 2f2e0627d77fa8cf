"""The build's bookkeeping, in one place: which outputs are current, what each was made from, and the
partial manifest that lets an interrupted build resume.

The manifest records, for each file, its sha256 and the sha256 of the files it was made from. A file
is current when it is on disk as recorded and its inputs are too. Checking that costs a ``stat`` per
file: the size and modification time recorded when the checksum was taken (``Manifest.file_stats``)
vouch for the checksum, and only a file whose size or time changed is hashed again (in the driver:
after an interruption or a repair, a few files). Workers hash what they write and report it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.files import file_sha256, is_temporary
from retro_platform.db.layout import FORMAT_VERSION, DatabaseLayout, Location
from retro_platform.db.manifest import Manifest, file_stat, load_manifest, write_manifest
from retro_platform.errors import DatabaseError

logger = logging.getLogger(__name__)

DB_ENTRIES = {"manifest.json", "tokenizer.json", "chunks", "embeddings", "index", "neighbors"}
"""Names a database folder may hold (a folder with anything else is not overwritten)."""

CHECKPOINT_SECONDS = 5.0
"""Partial manifests are written at most this often (the first one at once)."""

BUILD_SCHEME = "hash-buckets"
"""How documents are assigned to shards (recorded in the fingerprint): by a stable hash of their id,
so shards are formed by parallel tasks without a global pass. Databases built before (contiguous
ranges in corpus order) are refused for a resume and rebuilt from scratch in another folder."""


STAGED_FOLDERS = ("piece-files", "buckets")
"""The staging folder's entries a later run may reuse (``documents``: staged pieces and collated
buckets with the chunk counts; each records what it was made from); anything else there (an older
layout, a trained tokenizer) is deleted when a build starts."""


def fingerprint_inputs(config: PlatformConfig, digest: str, shards: int | None = None) -> dict[str, Any]:
    """Every setting (and the corpus content digest) that changes a database's bytes, not its resources;
    with ``database.num_shards`` null, the shard count the build derived (``shards``) too."""
    db = config.database
    embed = db.embed
    return {
        "build.scheme": BUILD_SCHEME,
        "chunk_len": db.chunk_len,
        "num_shards": db.num_shards,
        **({"num_shards.derived": shards} if db.num_shards is None and shards else {}),
        "corpus.source": db.corpus.source,
        "corpus.digest": digest,
        "corpus.max_documents": db.corpus.max_documents,
        "corpus.valid_fraction": db.corpus.valid_fraction,
        **({"corpus.mirror": True} if db.corpus.mirror else {}),
        **(
            {"corpus.mirror_header_words": db.corpus.mirror_header_words}
            if db.corpus.mirror and db.corpus.mirror_header_words
            else {}
        ),
        **({"corpus.exclude_ids": sorted(db.corpus.exclude_ids)} if db.corpus.exclude_ids else {}),
        "tokenizer.path": db.tokenizer.path,
        "tokenizer.vocab_size": db.tokenizer.vocab_size,
        "tokenizer.min_frequency": db.tokenizer.min_frequency,
        "tokenizer.sample_documents": db.tokenizer.sample_documents,
        "embed.model": embed.model,
        "embed.dtype": embed.dtype,
        "embed.compute_dtype": embed.compute_dtype,
        "embed.batch_size": embed.batch_size,
        "embed.rows_per_task": embed.rows_per_task,
        "index.factory": db.index.factory,
        "index.train_sample": db.index.train_sample,
        "index.include_valid": db.index.include_valid,
        "index.memory_budget_gb": db.index.memory_budget_gb,
    }


def build_fingerprint(inputs: dict[str, Any]) -> str:
    """Short hash of ``fingerprint_inputs``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


class Ledger:
    """What this build found, wrote and still has to write; keeps the partial manifest."""

    def __init__(self, layout: DatabaseLayout):
        self.layout = layout
        self.previous: Manifest | None = None  # the manifest found (complete or partial), if any
        self.files: dict[str, str] = {}  # relative path -> sha256, as recorded
        self.inputs: dict[str, dict[str, str]] = {}  # relative path -> {input relative path: sha256}
        self.written: list[str] = []  # relative paths written by this run
        self.fingerprint: dict[str, Any] = {}
        self.stats: dict[str, storage.FileStat] = {}  # relative path -> what it looked like with its checksum
        self._sha: dict[str, str | None] = {}
        self._last_checkpoint = -float("inf")

    def rel(self, path: Location) -> str:
        """Location relative to the database root (the manifest's key)."""
        return self.layout.relative(path)

    def sha(self, path: Location) -> str | None:
        """sha256 of a file as it is now (None when missing): the recorded one while its size and
        modification time (and ETag) are those recorded with it, else hashed (once per run)."""
        key = self.rel(path)
        if key not in self._sha:
            if not storage.exists(path):
                self._sha[key] = None
            else:
                stat = ((self.previous.file_stats or {}) if self.previous else {}).get(key)
                recorded = self.files.get(key)
                vouched = (
                    stat is not None
                    and stat.sha256 == recorded
                    and stat.same_version(storage.file_info(path))
                )
                self._sha[key] = recorded if vouched else file_sha256(path)
                if vouched:
                    self.stats[key] = stat
        return self._sha[key]

    def load_previous(self, inputs: dict[str, Any]) -> None:
        """Read the previous manifest (complete or partial); refuse a folder built with other settings."""
        self.fingerprint = inputs
        root = self.layout.root
        if not storage.exists(self.layout.manifest):
            names = {name.split("/")[0] for name in storage.list_files(root)}
            strays = sorted(n for n in names if n not in DB_ENTRIES)
            if strays and [n for n in strays if not n.startswith(".")]:
                raise DatabaseError(
                    f"{root} exists and is not a database (holds {strays[:5]}); choose another database.path"
                )
            return
        try:
            self.previous = load_manifest(root)
        except DatabaseError as exc:
            logger.warning("%s; rebuilding every stage", exc)
            return
        before = self.previous.fingerprint_inputs or {}
        if (
            inputs.get("num_shards") is None
            and "num_shards.derived" not in inputs
            and "num_shards.derived" in before
        ):
            # a check made before the corpus was sized (`retro demo`'s): the build compares the count itself
            inputs = self.fingerprint = {**inputs, "num_shards.derived": before["num_shards.derived"]}
        if self.previous.fingerprint != build_fingerprint(inputs):
            before = self.previous.fingerprint_inputs or {}
            changed = sorted(k for k in inputs if before.get(k) != inputs[k]) if before else ["(unknown)"]
            raise DatabaseError(
                f"database {root} was built with different settings (changed: {', '.join(changed)}); "
                "use another database.path, or delete the folder to rebuild it"
            )
        self.files = dict(self.previous.files)
        self.inputs = {k: dict(v) for k, v in (self.previous.inputs or {}).items()}

    def is_current(self, path: Location, inputs: list[Location]) -> bool:
        """True when ``path`` matches its recorded checksum and was made from its inputs as they are now."""
        key = self.rel(path)
        actual = self.sha(path)
        if actual is None or self.files.get(key) != actual:
            return False
        return self.inputs.get(key) == {self.rel(p): self.sha(p) for p in inputs}

    def record(self, path: Location, inputs: list[Location], sha256: str | None = None) -> None:
        """Note a freshly written file (with the checksum its writer reported, or hashed here) and what it
        was made from; then save the progress in the partial manifest."""
        key = self.rel(path)
        self._sha[key] = sha256 or file_sha256(path)
        self.files[key] = self._sha[key]
        self.inputs[key] = {self.rel(p): self.sha(p) for p in inputs}
        self.written.append(key)
        stat = file_stat(path, self._sha[key])
        if stat is not None:
            self.stats[key] = stat
        self.checkpoint()

    def checkpoint(self, force: bool = False) -> None:
        """Write a partial manifest (status 'building') so an interrupted build resumes from here: the
        progress so far, and every other section of the manifest this build started from. At most every
        ``CHECKPOINT_SECONDS`` unless forced (the first one is always written): a file written but not
        yet recorded is simply written again by the next run."""
        now = time.monotonic()
        if not force and now - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        self._last_checkpoint = now
        progress = dict(
            format_version=FORMAT_VERSION,
            status="building",
            fingerprint=build_fingerprint(self.fingerprint),
            fingerprint_inputs=self.fingerprint,
            files=dict(sorted(self.files.items())),
            inputs=dict(sorted(self.inputs.items())),
        )
        if self.previous is None:
            write_manifest(self.layout, Manifest(**progress), self.stats)
        else:
            write_manifest(self.layout, dataclasses.replace(self.previous, **progress), self.stats)

    def remove_temporaries(self) -> None:
        """Delete temporary files an interrupted build left (local ones; an S3 upload is all or nothing)."""
        if self.layout.remote or not self.layout.root.exists():
            return
        for path in self.layout.root.rglob("*"):
            if path.is_file() and is_temporary(path.name):
                logger.info("removing %s left by an interrupted build", path)
                path.unlink()


def staging_folder(layout: DatabaseLayout) -> str:
    """Where a build keeps its intermediate files (bucketed documents, a new tokenizer)."""
    return layout.staging("build")


def remove_staging(layout: DatabaseLayout) -> None:
    """Delete the build's intermediate files."""
    storage.delete_tree(staging_folder(layout))


def clean_staging(layout: DatabaseLayout) -> None:
    """Delete what a later run cannot reuse from the staging folder (an older layout's files, a trained
    tokenizer), keeping the staged pieces and buckets that record what they were made from."""
    staging = staging_folder(layout)
    names = storage.list_files(staging)
    for top in sorted({name.split("/")[0] for name in names} - set(STAGED_FOLDERS)):
        if top in names:
            storage.delete(storage.join(staging, top))
        else:
            logger.info("removing %s (staged by an earlier build, not reusable)", storage.join(staging, top))
            storage.delete_tree(storage.join(staging, top))
