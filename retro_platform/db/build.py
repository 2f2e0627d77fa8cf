"""`retro build-db`: corpus -> tokenizer -> chunk store -> embeddings -> index shards -> manifest.

Stages run on Ray: the corpus is parsed and chunks are counted and written by Ray Data tasks, the
chunks are embedded by a Ray Data actor pool, and index shards are filled shard by shard.

Idempotent and resumable. Every output file is written to a temporary name and renamed, and the
manifest records, for each file, its sha256 and the sha256 of the files it was made from. The manifest
is rewritten (``status: building``) after every shard of every stage, so a re-run after an interruption
or a deleted/corrupt file skips each output whose checksum and inputs still match and rebuilds only the
rest. Outputs are deterministic (fixed embedding tasks, seeded index sample, single-threaded graph
adds), so a resumed or repaired build is byte-identical to an uninterrupted one.

Input errors (corpus, tokenizer file, index factory, too few training vectors) are found before the
first file is written, so bad input never leaves a half-written database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray

from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.db import chunk as chunking
from retro_platform.db.corpus import Corpus, corpus_digest, load_documents
from retro_platform.db.embed import ChunkStoreEmbedder, encoder_dimension, resolve_encoder_path
from retro_platform.db.files import file_sha256, save_npy_atomic, write_index_atomic, write_table_atomic
from retro_platform.db.index import choose_factory, fill_index, min_training_vectors, new_index, train_index
from retro_platform.db.layout import FORMAT_VERSION, SPLITS, DatabaseLayout
from retro_platform.db.manifest import (
    Counts,
    EncoderInfo,
    IndexInfo,
    IndexShard,
    Manifest,
    SplitShard,
    TokenizerInfo,
    load_manifest,
    write_manifest,
)
from retro_platform.db.tokenizer import (
    eod_id,
    load_tokenizer_file,
    pad_id,
    save_tokenizer_atomic,
    train_tokenizer,
)
from retro_platform.errors import DatabaseError
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)

DB_ENTRIES = {"manifest.json", "tokenizer.json", "chunks", "embeddings", "index", "neighbors"}
"""Names a database folder may hold (a folder with anything else is not overwritten)."""


def fingerprint_inputs(config: PlatformConfig, digest: str) -> dict[str, Any]:
    """Every setting (and the corpus content digest) that changes a database's bytes, not its resources."""
    db = config.database
    embed = db.embed
    return {
        "chunk_len": db.chunk_len,
        "num_shards": db.num_shards,
        "corpus.source": db.corpus.source,
        "corpus.digest": digest,
        "corpus.max_documents": db.corpus.max_documents,
        "corpus.valid_fraction": db.corpus.valid_fraction,
        # only when set, so databases built before the setting existed keep their fingerprint
        **({"corpus.mirror": True} if db.corpus.mirror else {}),
        "tokenizer.path": db.tokenizer.path,
        "tokenizer.vocab_size": db.tokenizer.vocab_size,
        "tokenizer.min_frequency": db.tokenizer.min_frequency,
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


def shard_ranges(n_docs: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges of near-equal size (no empty shard)."""
    num_shards = max(1, min(num_shards, n_docs))
    bounds = [round(i * n_docs / num_shards) for i in range(num_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_shards)]


class _Builder:
    """One run of the build: decides what is current, writes what is not, keeps the manifest."""

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.db = config.database
        self.layout = DatabaseLayout(config.db_path)
        self.stats: dict[str, float] = {}
        self.previous: Manifest | None = None  # the manifest found (complete or partial), if any
        self.files: dict[str, str] = {}  # relative path -> sha256, as recorded
        self.inputs: dict[str, dict[str, str]] = {}  # relative path -> {input relative path: sha256}
        self.written: list[str] = []  # relative paths written by this run
        self._sha: dict[str, str | None] = {}
        self.task_resources = {config.ray.build_resource: 0.01} if config.ray.build_resource else None

    # ---- bookkeeping -------------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        return self.layout.relative(path)

    def sha(self, path: Path) -> str | None:
        """sha256 of a file on disk (None when missing), computed once per run."""
        key = self.rel(path)
        if key not in self._sha:
            self._sha[key] = file_sha256(path) if path.exists() else None
        return self._sha[key]

    def load_previous(self, inputs: dict[str, Any]) -> None:
        """Read the previous manifest (complete or partial); refuse a folder built with other settings."""
        root = self.layout.root
        if not self.layout.manifest.exists():
            if root.exists():
                strays = sorted(p.name for p in root.iterdir() if p.name not in DB_ENTRIES)
                if [n for n in strays if not n.startswith(".")]:
                    raise DatabaseError(
                        f"{root} exists and is not a database (holds {strays[:5]}); choose another database.path"
                    )
            return
        try:
            self.previous = load_manifest(root)
        except DatabaseError as exc:
            logger.warning("%s; rebuilding every stage", exc)
            return
        if self.previous.fingerprint != build_fingerprint(inputs):
            before = self.previous.fingerprint_inputs or {}
            changed = sorted(k for k in inputs if before.get(k) != inputs[k]) if before else ["(unknown)"]
            raise DatabaseError(
                f"database {root} was built with different settings (changed: {', '.join(changed)}); "
                "use another database.path, or delete the folder to rebuild it"
            )
        self.files = dict(self.previous.files)
        self.inputs = {k: dict(v) for k, v in (self.previous.inputs or {}).items()}

    def is_current(self, path: Path, inputs: list[Path]) -> bool:
        """True when ``path`` matches its recorded checksum and was made from its inputs as they are now."""
        key = self.rel(path)
        actual = self.sha(path)
        if actual is None or self.files.get(key) != actual:
            return False
        return self.inputs.get(key) == {self.rel(p): self.sha(p) for p in inputs}

    def record(self, path: Path, inputs: list[Path]) -> None:
        """Note a freshly written file and what it was made from."""
        key = self.rel(path)
        self._sha.pop(key, None)
        self.files[key] = self.sha(path)
        self.inputs[key] = {self.rel(p): self.sha(p) for p in inputs}
        self.written.append(key)

    def checkpoint(self, fingerprint: dict[str, Any]) -> None:
        """Write a partial manifest (status 'building') so an interrupted build resumes from here: the
        progress so far, and every other section of the manifest this build started from."""
        progress = dict(
            format_version=FORMAT_VERSION,
            status="building",
            fingerprint=build_fingerprint(fingerprint),
            fingerprint_inputs=fingerprint,
            files=dict(sorted(self.files.items())),
            inputs=dict(sorted(self.inputs.items())),
        )
        if self.previous is None:
            write_manifest(self.layout, Manifest(**progress))
        else:
            write_manifest(self.layout, dataclasses.replace(self.previous, **progress))

    def remove_temporaries(self) -> None:
        """Delete temporary files an interrupted build left (``.<name>.tmp``)."""
        if self.layout.root.exists():
            for tmp in self.layout.root.rglob(".*.tmp"):
                logger.info("removing %s left by an interrupted build", tmp)
                tmp.unlink()

    # ---- stages ------------------------------------------------------------------------------------
    def plan(self, corpus: Corpus, tokenizer) -> dict[str, list[SplitShard]]:
        """Shards of each split with document and chunk id ranges (chunks counted by Ray Data tasks)."""
        tok_json = tokenizer.to_str()
        chunk_len = self.db.chunk_len

        def count(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            from tokenizers import Tokenizer

            counts = chunking.count_chunks(batch["text"].tolist(), Tokenizer.from_str(tok_json), chunk_len)
            return {"position": batch["position"], "n_chunks": np.asarray(counts, dtype=np.int64)}

        plans: dict[str, list[SplitShard]] = {}
        doc_start = chunk_start = 0
        for split in SPLITS:
            docs = corpus.split(split)
            if not docs:
                plans[split] = []
                continue
            items = [{"position": i, "text": d["text"]} for i, d in enumerate(docs)]
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(docs) // 256, 16)))
            batches = list(
                ds.map_batches(
                    count, batch_size=256, num_cpus=0.5, resources=self.task_resources
                ).iter_batches(batch_size=None)
            )
            per_doc = np.zeros(len(docs), dtype=np.int64)
            for b in batches:
                per_doc[b["position"]] = b["n_chunks"]
            num_shards = self.db.num_shards if split == "train" else max(1, math.ceil(self.db.num_shards / 4))
            shards = []
            for i, (a, b) in enumerate(shard_ranges(len(docs), num_shards)):
                n_chunks = int(per_doc[a:b].sum())
                shards.append(
                    SplitShard(
                        shard=i,
                        split=split,
                        doc_start=doc_start + a,
                        doc_end=doc_start + b,
                        chunk_start=chunk_start,
                        chunk_end=chunk_start + n_chunks,
                    )
                )
                chunk_start += n_chunks
            doc_start += len(docs)
            plans[split] = shards
        return plans

    def check_index_trainable(self, plans, dim: int) -> str:
        """The index factory to build; refuse (before anything is written) one that cannot be trained."""
        index_cfg = self.db.index
        sources = self.index_sources(plans)
        n_total = sum(s.num_chunks for s in sources)
        factory = index_cfg.factory
        if factory == "auto":
            factory = choose_factory(n_total, dim, index_cfg.memory_budget_gb, index_cfg.train_sample)
        new_index(factory, dim)  # raises DatabaseError naming database.index.factory for a bad string
        need = min_training_vectors(factory)
        have = min(index_cfg.train_sample, n_total)
        if have < need:
            raise DatabaseError(
                f"index {factory!r} needs at least {need} training vectors but this database gives {have} "
                f"({n_total} chunks to index, database.index.train_sample={index_cfg.train_sample}); use a "
                "smaller index (fewer IVF lists / PQ bits), 'Flat', or database.index.factory=auto"
            )
        return factory

    def index_sources(self, plans) -> list[SplitShard]:
        """The chunk-store shards the index holds, in index-shard order."""
        return list(plans["train"]) + (list(plans["valid"]) if self.db.index.include_valid else [])

    def chunks(self, corpus: Corpus, tokenizer, plans, fingerprint) -> None:
        todo = [
            s
            for split in SPLITS
            for s in plans[split]
            if not self.is_current(self.layout.chunks(split, s.shard), [self.layout.tokenizer])
        ]
        if not todo:
            logger.info("chunks: all %d shards up to date", sum(len(p) for p in plans.values()))
            return
        t0 = time.perf_counter()
        tok_json = tokenizer.to_str()
        chunk_len = self.db.chunk_len
        row_group = self.db.embed.rows_per_task
        root = str(self.layout.root)

        def write_shard(row: dict[str, Any]) -> dict[str, Any]:
            from tokenizers import Tokenizer

            table = chunking.chunk_documents(
                row["docs"], Tokenizer.from_str(tok_json), chunk_len, row["doc_start"], row["chunk_start"]
            )
            if table.num_rows != row["chunk_end"] - row["chunk_start"]:
                raise RuntimeError(f"shard {row['shard']}: chunk count changed between planning and writing")
            path = DatabaseLayout(root).chunks(row["split"], row["shard"])
            write_table_atomic(table, path, row_group_size=row_group)
            return {"shard": row["shard"], "split": row["split"], "rows": table.num_rows}

        items = []
        for s in todo:
            offset = 0 if s.split == "train" else len(corpus.train)
            docs = [
                {"id": d["id"], "text": d["text"]}
                for d in corpus.split(s.split)[s.doc_start - offset : s.doc_end - offset]
            ]
            items.append({**dataclasses.asdict(s), "docs": docs})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = 0
        for done in ds.map(write_shard, num_cpus=0.5, resources=self.task_resources).iter_rows():
            self.record(self.layout.chunks(done["split"], done["shard"]), [self.layout.tokenizer])
            self.checkpoint(fingerprint)
            rows += done["rows"]
        self.stats["chunk_seconds"] = time.perf_counter() - t0
        self.stats["chunks_per_second_chunking"] = rows / self.stats["chunk_seconds"]
        logger.info(
            "chunks: wrote %d shards, %d chunks (%.1fs)", len(todo), rows, self.stats["chunk_seconds"]
        )

    def embeddings(self, plans, fingerprint) -> None:
        todo = [
            s
            for split in SPLITS
            for s in plans[split]
            if not self.is_current(
                self.layout.embeddings(split, s.shard), [self.layout.chunks(split, s.shard)]
            )
        ]
        if not todo:
            logger.info("embeddings: all shards up to date")
            return
        embed = self.db.embed
        use_gpu = embed.gpus_per_actor > 0
        # one task = one row group of a chunk-store shard, embedded in one encode call (deterministic)
        items = []
        for s in todo:
            path = self.layout.chunks(s.split, s.shard)
            meta = pq.ParquetFile(path).metadata
            start = s.chunk_start
            for group in range(meta.num_row_groups):
                items.append({"path": str(path), "row_group": group, "chunk_start": start})
                start += meta.row_group(group).num_rows
        total = sum(s.num_chunks for s in todo)
        t0 = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ChunkStoreEmbedder,
            fn_constructor_kwargs=dict(
                model=embed.model,
                compute_dtype=embed.compute_dtype,
                batch_size=embed.gpu_batch_size if use_gpu else embed.batch_size,
                out_dtype=embed.dtype,
                threads=embed.threads_per_actor or max(1, math.ceil(embed.cpus_per_actor)),
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=embed.num_actors),
            num_cpus=embed.cpus_per_actor,
            num_gpus=embed.gpus_per_actor or None,
            resources=self.task_resources,
        )
        # Ray Data may reorder tasks: place rows by chunk id; write each shard as soon as it is complete
        arrays: dict[int, np.ndarray] = {}
        filled: dict[int, int] = {}
        starts = np.array([s.chunk_start for s in todo], dtype=np.int64)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            vectors = batch["embedding"]
            if vectors.dtype == object:
                vectors = np.stack(vectors)
            which = np.searchsorted(starts, batch["chunk_id"], side="right") - 1
            for i in np.unique(which):
                s = todo[i]
                sel = which == i
                if i not in arrays:
                    arrays[i] = np.zeros((s.num_chunks, vectors.shape[1]), embed.dtype)
                    filled[i] = 0
                arrays[i][batch["chunk_id"][sel] - s.chunk_start] = vectors[sel]
                filled[i] += int(sel.sum())
                if filled[i] == len(arrays[i]):
                    path = self.layout.embeddings(s.split, s.shard)
                    save_npy_atomic(arrays.pop(i), path)
                    self.record(path, [self.layout.chunks(s.split, s.shard)])
                    self.checkpoint(fingerprint)
        if arrays:
            raise RuntimeError(f"embedding stage ended with {len(arrays)} incomplete shards")
        self.stats["embed_seconds"] = time.perf_counter() - t0
        self.stats["chunks_per_second_embedding"] = total / self.stats["embed_seconds"]
        logger.info(
            "embeddings: %d chunks in %.1fs (%.0f chunks/s)",
            total,
            self.stats["embed_seconds"],
            self.stats["chunks_per_second_embedding"],
        )

    def index(self, plans, factory: str, fingerprint) -> IndexInfo:
        index_cfg = self.db.index
        sources = self.index_sources(plans)
        n_total = sum(s.num_chunks for s in sources)
        trained_path = self.layout.root / "index" / "trained.faiss"
        emb_paths = [self.layout.embeddings(s.split, s.shard) for s in sources]
        t0 = time.perf_counter()
        if self.is_current(trained_path, emb_paths):
            trained = faiss.read_index(str(trained_path))
        else:
            # a seeded sample, spread over every shard in proportion to its size
            rng = np.random.default_rng(0)
            sample = []
            for s, path in zip(sources, emb_paths, strict=True):
                n = s.num_chunks
                take = min(n, max(1, round(index_cfg.train_sample * n / n_total)))
                vectors = np.load(path, mmap_mode="r")
                rows = np.sort(rng.choice(n, size=take, replace=False))
                sample.append(np.asarray(vectors[rows], dtype=np.float32))
            trained = train_index(factory, np.concatenate(sample), use_gpu=index_cfg.use_gpu)
            write_index_atomic(trained, trained_path)
            self.record(trained_path, emb_paths)
            self.checkpoint(fingerprint)
        # graph indexes (HNSW) are order-dependent when filled on several threads
        single_thread = index_cfg.deterministic_add and "HNSW" in factory
        shards = []
        for number, (s, emb_path) in enumerate(zip(sources, emb_paths, strict=True)):
            chunks_path = self.layout.chunks(s.split, s.shard)
            outputs = [
                (self.layout.index(number), [emb_path, trained_path]),
                (self.layout.shard_tokens(number), [chunks_path]),
                (self.layout.shard_doc_ids(number), [chunks_path]),
            ]
            if not all(self.is_current(path, inputs) for path, inputs in outputs):
                with _omp_threads(1 if single_thread else None):
                    index = fill_index(
                        trained, np.load(emb_path, mmap_mode="r"), index_cfg.add_block, index_cfg.use_gpu
                    )
                write_index_atomic(index, outputs[0][0])
                table = chunking.read_chunks(chunks_path, ["tokens", "doc_id"])
                save_npy_atomic(chunking.tokens_array(table, self.db.chunk_len), outputs[1][0])
                save_npy_atomic(table.column("doc_id").to_numpy().astype(np.int64), outputs[2][0])
                for path, inputs in outputs:
                    self.record(path, inputs)
                self.checkpoint(fingerprint)
            shards.append(IndexShard.of(number, s))
        self.stats["index_seconds"] = time.perf_counter() - t0
        self.stats["vectors_per_second_index"] = n_total / self.stats["index_seconds"]
        logger.info(
            "index: %s over %d vectors in %d shards (%.1fs)",
            factory,
            n_total,
            len(shards),
            self.stats["index_seconds"],
        )
        return IndexInfo(
            factory=factory,
            requested=index_cfg.factory,
            metric="inner_product",
            includes_valid=index_cfg.include_valid,
            trained_file=self.rel(trained_path),
            shards=shards,
        )

    def carried_forward(self) -> tuple[dict[str, list[SplitShard]], list[IndexShard], list[str]]:
        """Shards added later by `retro add-docs` (not in the corpus): kept as they are, checked."""
        splits: dict[str, list[SplitShard]] = {}
        shards: list[IndexShard] = []
        if self.previous is not None:  # a partial manifest may lack either section
            splits = {k: v for k, v in (self.previous.splits or {}).items() if k not in SPLITS}
            if self.previous.index is not None:
                shards = [s for s in self.previous.index.shards if s.split not in SPLITS]
        files = []
        for split, entries in splits.items():
            for s in entries:
                files += [
                    self.rel(self.layout.chunks(split, s.shard)),
                    self.rel(self.layout.embeddings(split, s.shard)),
                ]
        for s in shards:
            n = s.shard
            files += [
                self.rel(p)
                for p in (self.layout.index(n), self.layout.shard_tokens(n), self.layout.shard_doc_ids(n))
            ]
        for key in files:
            path = self.layout.root / key
            if self.sha(path) != self.files.get(key):
                raise DatabaseError(
                    f"database file {path} (added by `retro add-docs`) is missing or corrupt and cannot be "
                    "rebuilt from the corpus; restore it, or delete the database and rebuild it"
                )
        return splits, shards, files

    # ---- whole build -------------------------------------------------------------------------------
    def run(self) -> Manifest:
        t_start = time.perf_counter()
        # 1. everything that can refuse the input, before the first file is written
        fingerprint = fingerprint_inputs(self.config, corpus_digest(self.db.corpus.source))
        self.load_previous(fingerprint)
        t0 = time.perf_counter()
        corpus = load_documents(self.db.corpus)
        self.stats["corpus_seconds"] = time.perf_counter() - t0
        self.stats["documents_per_second_corpus"] = corpus.read / self.stats["corpus_seconds"]
        t0 = time.perf_counter()
        tokenizer_current = self.is_current(self.layout.tokenizer, [])
        if tokenizer_current:
            tokenizer = load_tokenizer_file(self.layout.tokenizer)
        elif self.db.tokenizer.path:
            tokenizer = load_tokenizer_file(self.db.tokenizer.path)
        else:
            tokenizer = train_tokenizer((d["text"] for d in corpus.train), self.db.tokenizer)
        self.stats["tokenizer_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plans = self.plan(corpus, tokenizer)
        self.stats["plan_seconds"] = time.perf_counter() - t0
        dim = encoder_dimension(self.db.embed.model)
        factory = self.check_index_trainable(plans, dim)
        added_splits, added_shards, added_files = self.carried_forward()

        # 2. the stages, each skipping what is current
        self.remove_temporaries()
        if tokenizer_current:
            logger.info("tokenizer: up to date")
        else:
            save_tokenizer_atomic(tokenizer, self.layout.tokenizer)
            self.record(self.layout.tokenizer, [])
            self.checkpoint(fingerprint)
            logger.info(
                "tokenizer: %d tokens (%.1fs)", tokenizer.get_vocab_size(), self.stats["tokenizer_seconds"]
            )
        tokenizer = load_tokenizer_file(self.layout.tokenizer)
        self.chunks(corpus, tokenizer, plans, fingerprint)
        self.embeddings(plans, fingerprint)
        index_info = self.index(plans, factory, fingerprint)
        index_info.shards += added_shards

        # 3. the manifest: only the files of this database, with their checksums and inputs
        paths = [self.layout.tokenizer, self.layout.root / index_info.trained_file]
        for split in SPLITS:
            for s in plans[split]:
                paths += [self.layout.chunks(split, s.shard), self.layout.embeddings(split, s.shard)]
        for s in index_info.shards[: len(index_info.shards) - len(added_shards)]:
            n = s.shard
            paths += [self.layout.index(n), self.layout.shard_tokens(n), self.layout.shard_doc_ids(n)]
        keys = [self.rel(p) for p in paths] + added_files
        files = {k: self.files[k] for k in sorted(keys)}
        previous = self.previous
        neighbors = (previous.neighbors if previous else None) or {}
        unchanged = all((previous.files if previous else {}).get(k) == v for k, v in files.items())
        if neighbors and unchanged:  # precomputed neighbour tables stay valid while nothing else changed
            files.update({v.file: self.files[v.file] for v in neighbors.values() if v.file in self.files})
        else:
            neighbors = {}
        counts = self._counts(corpus, plans)
        for split, entries in added_splits.items():
            counts.documents[split] = previous.counts.documents.get(split, 0)
            counts.chunks[split] = sum(s.num_chunks for s in entries)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            status="complete",
            db_id=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
            fingerprint=build_fingerprint(fingerprint),
            fingerprint_inputs=fingerprint,
            config=self.config.to_dict()["database"],
            chunk_len=self.db.chunk_len,
            tokenizer=TokenizerInfo(
                file="tokenizer.json",
                sha256=files["tokenizer.json"],
                vocab_size=tokenizer.get_vocab_size(),
                pad_id=pad_id(tokenizer),
                eod_id=eod_id(tokenizer),
            ),
            encoder=EncoderInfo(
                name=self.db.embed.model,
                path=resolve_encoder_path(self.db.embed.model),
                dim=dim,
                dtype=self.db.embed.dtype,
                compute_dtype=self.db.embed.compute_dtype,
                batch_size=self.db.embed.batch_size,
                normalized=True,
            ),
            counts=counts,
            splits={**{split: plans[split] for split in SPLITS}, **added_splits},
            index=index_info,
            files=files,
            inputs={k: self.inputs[k] for k in files if k in self.inputs},
            neighbors=neighbors,
            revision=previous.revision if previous else None,
        )
        if self.written or manifest != previous:  # a checkpoint may have replaced it
            write_manifest(self.layout, manifest)
        self.stats["total_seconds"] = time.perf_counter() - t_start
        logger.info(
            "database %s: %d documents, %d chunks, %d files written (%.1fs)",
            self.layout.root,
            sum(counts.documents.values()),
            sum(counts.chunks.values()),
            len(self.written),
            self.stats["total_seconds"],
        )
        return manifest

    def _counts(self, corpus: Corpus, plans) -> Counts:
        real = total = 0
        for split in SPLITS:
            for s in plans[split]:
                table = chunking.read_chunks(self.layout.chunks(split, s.shard), ["n_tokens"])
                real += int(np.asarray(table.column("n_tokens")).sum())
                total += table.num_rows * self.db.chunk_len
        return Counts(
            documents_read=corpus.read,
            documents_empty=corpus.empty,
            documents={split: len(corpus.split(split)) for split in SPLITS},
            chunks={split: sum(s.num_chunks for s in plans[split]) for split in SPLITS},
            tokens=real,
            padding_fraction=1 - real / total if total else 0.0,
        )


@contextlib.contextmanager
def _omp_threads(threads: int | None):
    """Run FAISS with ``threads`` OpenMP threads inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def build_database(config: PlatformConfig) -> Manifest:
    """Build, resume or repair the database at ``config.db_path`` -> its manifest. Tracked in MLflow.

    Logs the config as params, counts and per-stage throughput as metrics, and manifest.json as an
    artifact of an MLflow run tagged ``stage=build-db``.
    """
    with ray_session(config):
        builder = _Builder(config)
        with tracking.start_run(config, stage="build-db") as run:
            tracking.log_params(config.flatten())
            manifest = builder.run()
            metrics = dict(builder.stats)
            metrics.update(tracking.flatten_numbers(dataclasses.asdict(manifest.counts)))
            metrics["files_written"] = len(builder.written)
            tracking.log_metrics(metrics)
            tracking.set_tags({"db_id": manifest.db_id, "index": manifest.index.factory})
            tracking.log_artifact(builder.layout.manifest)
            logger.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
        return manifest
