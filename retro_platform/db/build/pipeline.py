"""One run of the build: the stages in order, each skipping what is current; the driver plans, records
checksums and writes the manifest, and every byte of data is read and written by Ray tasks and actors.

    documents (corpus pieces -> hash buckets, staged)  -> tokenizer (sample, one task)
    -> chunk counts -> plan (ids from per-bucket counts)  -> input checks (index trainable)
    -> chunks (task per shard) -> embeddings (encoder actor pool) -> index (train task, fill per shard)
    -> manifest

Everything that can refuse the input runs before the first file of the database is written: a bad
corpus, tokenizer file or index factory leaves the database folder as it was. Outputs are
deterministic (documents in corpus order within a bucket, a tokenizer trained on a fixed sample, fixed
embedding calls, a seeded index sample, single-threaded graph adds), so a resumed or repaired build is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from retro_platform.config import PlatformConfig
from retro_platform.db.build.chunks import plan_shards, prepare_tokenizer, write_chunks
from retro_platform.db.build.documents import Documents, stage_documents
from retro_platform.db.build.embeddings import write_embeddings
from retro_platform.db.build.indexing import build_index, check_index_trainable
from retro_platform.db.build.ledger import (
    Ledger,
    build_fingerprint,
    clean_staging,
    fingerprint_inputs,
    remove_staging,
    staging_folder,
)
from retro_platform.db.embed import encoder_dimension, resolve_encoder_path
from retro_platform.db.files import copy_file
from retro_platform.db.layout import FORMAT_VERSION, SPLITS, DatabaseLayout
from retro_platform.db.manifest import (
    Counts,
    EncoderInfo,
    IndexShard,
    Manifest,
    SplitShard,
    TokenizerInfo,
    write_manifest,
)
from retro_platform.db.tokenizer import eod_id, load_tokenizer_file, pad_id
from retro_platform.errors import DatabaseError

logger = logging.getLogger(__name__)


class Build:
    """One run of the build over ``config.db_path``."""

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.layout = DatabaseLayout(config.db_path)
        self.ledger = Ledger(self.layout)
        self.stats: dict[str, float] = {}
        self.documents: Documents | None = None
        """What the documents stage found (``Documents.parsed``: the pieces this run read)."""

    @property
    def written(self) -> list[str]:
        """Relative paths this run wrote."""
        return self.ledger.written

    def run(self) -> Manifest:
        """Build, resume or repair the database -> its manifest.

        The staging folder (staged corpus pieces, collated buckets, chunk counts) is kept when the build
        fails, so the next run reuses what is current there; it is removed once the build completes."""
        staging = staging_folder(self.layout)
        clean_staging(self.layout)  # keeps only what a later run can reuse
        manifest = self._run(staging)
        remove_staging(self.layout)
        return manifest

    def _run(self, staging: str) -> Manifest:
        db, ledger, layout = self.config.database, self.ledger, self.layout
        t_start = time.perf_counter()
        # 1. everything that can refuse the input, before the first file of the database is written
        t0 = time.perf_counter()
        documents = stage_documents(self.config, staging)
        self.stats["corpus_seconds"] = time.perf_counter() - t0
        self.stats["documents_per_second_corpus"] = documents.read / self.stats["corpus_seconds"]
        self.stats["pieces_parsed"] = len(documents.parsed)
        self.documents = documents
        ledger.load_previous(fingerprint_inputs(self.config, documents.digest, documents.shards))
        t0 = time.perf_counter()
        tokenizer_file = prepare_tokenizer(self.config, ledger, documents, staging)
        self.stats["tokenizer_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plans, real_tokens = plan_shards(self.config, documents, tokenizer_file, staging)
        self.stats["plan_seconds"] = time.perf_counter() - t0
        dim = encoder_dimension(db.embed.model)
        factory = check_index_trainable(self.config, plans, dim)
        added_splits, added_shards, added_files = self.carried_forward()

        # 2. the stages, each skipping what is current
        ledger.remove_temporaries()
        if tokenizer_file != layout.tokenizer:
            ledger.record(layout.tokenizer, [], copy_file(tokenizer_file, layout.tokenizer))
            logger.info("tokenizer: %d tokens", load_tokenizer_file(layout.tokenizer).get_vocab_size())
        t0 = time.perf_counter()
        rows = write_chunks(self.config, ledger, documents, layout.tokenizer, plans)
        if rows:
            self.stats["chunk_seconds"] = time.perf_counter() - t0
            self.stats["chunks_per_second_chunking"] = rows / self.stats["chunk_seconds"]
            logger.info("chunks: wrote %d chunks (%.1fs)", rows, self.stats["chunk_seconds"])
        self.stats.update(write_embeddings(self.config, ledger, plans))
        index_info, index_stats = build_index(self.config, ledger, plans, factory)
        self.stats.update(index_stats)
        ledger.remove_temporaries()  # those of writers that died with a lost node while Ray retried them
        index_info.shards += added_shards

        # 3. the manifest: only the files of this database, with their checksums and inputs
        paths = [layout.tokenizer, layout.path(index_info.trained_file)]
        for split in SPLITS:
            for s in plans[split]:
                paths += [layout.chunks(split, s.shard), layout.embeddings(split, s.shard)]
        for s in index_info.shards[: len(index_info.shards) - len(added_shards)]:
            n = s.shard
            paths += [layout.index(n), layout.shard_tokens(n), layout.shard_doc_ids(n)]
        keys = [ledger.rel(p) for p in paths] + added_files
        files = {k: ledger.files[k] for k in sorted(keys)}
        previous = ledger.previous
        neighbors = (previous.neighbors if previous else None) or {}
        unchanged = all((previous.files if previous else {}).get(k) == v for k, v in files.items())
        tables = {split: v.shard_files or [v.file] for split, v in neighbors.items()}
        kept = all(f in ledger.files for names in tables.values() for f in names)
        if (
            neighbors and unchanged and kept
        ):  # precomputed neighbour tables stay valid while nothing else changed
            files.update({f: ledger.files[f] for names in tables.values() for f in names})
        else:
            neighbors = {}
        counts = self._counts(documents, plans, real_tokens)
        for split, entries in added_splits.items():
            counts.documents[split] = previous.counts.documents.get(split, 0)
            counts.chunks[split] = sum(s.num_chunks for s in entries)
        tokenizer = load_tokenizer_file(layout.tokenizer)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            status="complete",
            db_id=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
            fingerprint=build_fingerprint(ledger.fingerprint),
            fingerprint_inputs=ledger.fingerprint,
            config=self.config.to_dict()["database"],
            chunk_len=db.chunk_len,
            tokenizer=TokenizerInfo(
                file="tokenizer.json",
                sha256=files["tokenizer.json"],
                vocab_size=tokenizer.get_vocab_size(),
                pad_id=pad_id(tokenizer),
                eod_id=eod_id(tokenizer),
            ),
            encoder=EncoderInfo(
                name=db.embed.model,
                path=resolve_encoder_path(db.embed.model),
                dim=dim,
                dtype=db.embed.dtype,
                compute_dtype=db.embed.compute_dtype,
                batch_size=db.embed.batch_size,
                normalized=True,
            ),
            counts=counts,
            splits={**{split: plans[split] for split in SPLITS}, **added_splits},
            index=index_info,
            files=files,
            inputs={k: ledger.inputs[k] for k in files if k in ledger.inputs},
            neighbors=neighbors,
            revision=previous.revision if previous else None,
        )
        if ledger.written or manifest != previous:  # a checkpoint may have replaced it
            write_manifest(layout, manifest, ledger.stats)
        self.stats["total_seconds"] = time.perf_counter() - t_start
        logger.info(
            "database %s: %d documents, %d chunks, %d files written (%.1fs)",
            layout.root,
            sum(counts.documents.values()),
            sum(counts.chunks.values()),
            len(ledger.written),
            self.stats["total_seconds"],
        )
        return manifest

    def carried_forward(self) -> tuple[dict[str, list[SplitShard]], list[IndexShard], list[str]]:
        """Shards added later by `retro add-docs` (not in the corpus): kept as they are, checked."""
        ledger, layout = self.ledger, self.layout
        splits: dict[str, list[SplitShard]] = {}
        shards: list[IndexShard] = []
        previous = ledger.previous
        if previous is not None:  # a partial manifest may lack either section
            splits = {k: v for k, v in (previous.splits or {}).items() if k not in SPLITS}
            if previous.index is not None:
                shards = [s for s in previous.index.shards if s.split not in SPLITS]
        files = []
        for split, entries in splits.items():
            for s in entries:
                files += [
                    ledger.rel(layout.chunks(split, s.shard)),
                    ledger.rel(layout.embeddings(split, s.shard)),
                ]
        for s in shards:
            n = s.shard
            files += [
                ledger.rel(p) for p in (layout.index(n), layout.shard_tokens(n), layout.shard_doc_ids(n))
            ]
        for key in files:
            path = layout.path(key)
            if ledger.sha(path) != ledger.files.get(key):
                raise DatabaseError(
                    f"database file {path} (added by `retro add-docs`) is missing or corrupt and cannot be "
                    "rebuilt from the corpus; restore it, or delete the database and rebuild it"
                )
        return splits, shards, files

    def _counts(self, documents: Documents, plans: dict[str, list[SplitShard]], real_tokens: int) -> Counts:
        total = sum(s.num_chunks for split in SPLITS for s in plans[split]) * self.config.database.chunk_len
        return Counts(
            documents_read=documents.read,
            documents_empty=documents.empty,
            documents={split: documents.count(split) for split in SPLITS},
            chunks={split: sum(s.num_chunks for s in plans[split]) for split in SPLITS},
            tokens=real_tokens,
            padding_fraction=1 - real_tokens / total if total else 0.0,
        )
