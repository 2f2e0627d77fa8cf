"""`retro build-db`: corpus -> tokenizer -> chunk store -> embeddings -> index shards -> manifest.

Stages run on Ray (chunking as Ray Data tasks, embedding as a Ray Data actor pool) and are idempotent:
every output file is written atomically and recorded with its checksum in the manifest after each
stage, so a re-run skips shards whose outputs exist and match, rebuilds a missing or corrupt shard (and
what depends on it), and refuses a folder that holds a database built with other settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ray

from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.corpus import Corpus, load_documents
from retro_platform.db import chunk as chunking
from retro_platform.db.embed import Embedder, resolve_encoder_path
from retro_platform.db.index import choose_factory, fill_index, train_index
from retro_platform.db.layout import FORMAT_VERSION, SPLITS, DatabaseLayout
from retro_platform.db.manifest import load_manifest, write_manifest
from retro_platform.errors import DatabaseError
from retro_platform.ray_utils import init_ray
from retro_platform.tokenizer import eod_id, file_sha256, load_tokenizer_file, pad_id, train_tokenizer

logger = logging.getLogger(__name__)


def build_fingerprint(config: PlatformConfig) -> str:
    """Hash of every setting that changes the database's content (not its resources)."""
    db = config.database
    relevant = {
        "chunk_len": db.chunk_len,
        "num_shards": db.num_shards,
        "corpus": {
            "source": db.corpus.source,
            "max": db.corpus.max_documents,
            "valid": db.corpus.valid_fraction,
        },
        "tokenizer": [db.tokenizer.path, db.tokenizer.vocab_size, db.tokenizer.min_frequency],
        "encoder": [db.embed.model, db.embed.dtype],
        "index": [db.index.factory, db.index.train_sample, db.index.include_valid, db.index.memory_budget_gb],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def shard_ranges(n_docs: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges of near-equal size (no empty shard)."""
    num_shards = max(1, min(num_shards, n_docs))
    bounds = [round(i * n_docs / num_shards) for i in range(num_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_shards)]


class _Builder:
    """One run of the build; holds the manifest being written."""

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.db = config.database
        self.layout = DatabaseLayout(config.db_path)
        self.stats: dict[str, float] = {}
        self.previous: dict[str, Any] = {}
        self.rebuilt: set[str] = set()  # relative paths written in this run

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _load_previous(self) -> None:
        if not self.layout.manifest.exists():
            if self.layout.root.exists() and any(self.layout.root.iterdir()):
                stray = [p.name for p in self.layout.root.iterdir()]
                known = {"chunks", "embeddings", "index", "tokenizer.json", "neighbors"}
                if not set(stray) <= known and not all(n.startswith(".") for n in set(stray) - known):
                    raise DatabaseError(
                        f"{self.layout.root} exists and is not a database (holds {sorted(stray)[:5]}); "
                        "choose another database.path"
                    )
            return
        try:
            self.previous = load_manifest(self.layout.root)
        except DatabaseError:
            logger.warning("manifest of %s unreadable: rebuilding every stage", self.layout.root)
            return
        if self.previous.get("fingerprint") != build_fingerprint(self.config):
            raise DatabaseError(
                f"database {self.layout.root} was built with different settings "
                f"(fingerprint {self.previous.get('fingerprint')} vs {build_fingerprint(self.config)}); "
                "use another database.path or delete the folder to rebuild it"
            )

    def _is_current(self, path: Path, *depends_on: Path) -> bool:
        """True when ``path`` exists, matches its recorded checksum, and nothing it depends on was rebuilt."""
        relative = self.layout.relative(path) if path.exists() else None
        if relative is None:
            return False
        if any(self.layout.relative(d) in self.rebuilt for d in depends_on if d.exists()):
            return False
        recorded = self.previous.get("files", {}).get(relative)
        return recorded is not None and recorded == file_sha256(path)

    def _record(self, *paths: Path) -> None:
        for path in paths:
            self.rebuilt.add(self.layout.relative(path))

    def _files(self, paths: list[Path]) -> dict[str, str]:
        return {self.layout.relative(p): file_sha256(p) for p in paths if p.exists()}

    # ---- stages ------------------------------------------------------------------------------------
    def tokenizer(self, corpus: Corpus):
        path = self.layout.tokenizer
        if self._is_current(path):
            logger.info("tokenizer: up to date")
            return load_tokenizer_file(path)
        t0 = time.perf_counter()
        if self.db.tokenizer.path:
            tok = load_tokenizer_file(self.db.tokenizer.path)
        else:
            tok = train_tokenizer((d["text"] for d in corpus.train), self.db.tokenizer)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".tokenizer.json.tmp")
        tok.save(str(tmp))
        tmp.replace(path)
        self._record(path)
        self.stats["tokenizer_seconds"] = time.perf_counter() - t0
        logger.info("tokenizer: %d tokens (%.1fs)", tok.get_vocab_size(), self.stats["tokenizer_seconds"])
        return load_tokenizer_file(path)

    def plan(self, corpus: Corpus, tokenizer) -> dict[str, list[dict[str, Any]]]:
        """Shards of each split with document and chunk id ranges (counted with Ray Data tasks)."""
        tok_json = tokenizer.to_str()
        chunk_len = self.db.chunk_len

        def count(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(tok_json)
            counts = chunking.count_chunks(batch["text"].tolist(), tok, chunk_len)
            return {"n_chunks": np.asarray(counts, dtype=np.int64)}

        plans: dict[str, list[dict[str, Any]]] = {}
        doc_start = chunk_start = 0
        for split in SPLITS:
            docs = corpus.split(split)
            if not docs:
                plans[split] = []
                continue
            ds = ray.data.from_items(
                [{"text": d["text"]} for d in docs], override_num_blocks=min(len(docs), 8)
            )
            per_doc = np.concatenate(
                [
                    b["n_chunks"]
                    for b in ds.map_batches(count, batch_size=256, num_cpus=0.5).iter_batches(batch_size=None)
                ]
            )
            num_shards = self.db.num_shards if split == "train" else max(1, math.ceil(self.db.num_shards / 4))
            shards = []
            for i, (a, b) in enumerate(shard_ranges(len(docs), num_shards)):
                n_chunks = int(per_doc[a:b].sum())
                shards.append(
                    dict(
                        shard=i,
                        split=split,
                        doc_start=doc_start + a,
                        doc_end=doc_start + b,
                        chunk_start=chunk_start,
                        chunk_end=chunk_start + n_chunks,
                        local_docs=(a, b),
                    )
                )
                chunk_start += n_chunks
            doc_start += len(docs)
            plans[split] = shards
        return plans

    def chunks(self, corpus: Corpus, tokenizer, plans) -> None:
        todo = [
            s
            for split in SPLITS
            for s in plans[split]
            if not self._is_current(self.layout.chunks(split, s["shard"]), self.layout.tokenizer)
        ]
        if not todo:
            logger.info("chunks: all %d shards up to date", sum(len(p) for p in plans.values()))
            return
        t0 = time.perf_counter()
        tok_json = tokenizer.to_str()
        chunk_len = self.db.chunk_len
        layout_root = str(self.layout.root)

        def write_shard(row: dict[str, Any]) -> dict[str, Any]:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(tok_json)
            table = chunking.chunk_documents(
                row["docs"], tok, chunk_len, row["doc_start"], row["chunk_start"]
            )
            assert table.num_rows == row["chunk_end"] - row["chunk_start"], (
                "chunk count changed between passes"
            )
            chunking.write_table_atomic(table, DatabaseLayout(layout_root).chunks(row["split"], row["shard"]))
            return {"shard": row["shard"], "split": row["split"], "rows": table.num_rows}

        items = []
        for s in todo:
            a, b = s["local_docs"]
            items.append(
                {**{k: v for k, v in s.items() if k != "local_docs"}, "docs": corpus.split(s["split"])[a:b]}
            )
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        done = ds.map(write_shard, num_cpus=0.5).take_all()
        for s in done:
            self._record(self.layout.chunks(s["split"], s["shard"]))
        rows = sum(s["rows"] for s in done)
        self.stats["chunk_seconds"] = time.perf_counter() - t0
        self.stats["chunks_per_second_chunking"] = rows / self.stats["chunk_seconds"]
        logger.info(
            "chunks: wrote %d shards, %d chunks (%.1fs)", len(done), rows, self.stats["chunk_seconds"]
        )

    def embeddings(self, plans) -> int:
        todo = [
            s
            for split in SPLITS
            for s in plans[split]
            if not self._is_current(
                self.layout.embeddings(split, s["shard"]), self.layout.chunks(split, s["shard"])
            )
        ]
        if not todo:
            logger.info("embeddings: all shards up to date")
            first = plans["train"][0]
            return int(np.load(self.layout.embeddings("train", first["shard"]), mmap_mode="r").shape[1])
        embed = self.db.embed
        use_gpu = embed.gpus_per_actor > 0
        threads = embed.threads_per_actor or max(1, math.ceil(embed.cpus_per_actor))
        resources = {self.config.ray.build_resource: 0.01} if self.config.ray.build_resource else None
        files = [str(self.layout.chunks(s["split"], s["shard"])) for s in todo]
        total = sum(s["chunk_end"] - s["chunk_start"] for s in todo)
        t0 = time.perf_counter()
        ds = ray.data.read_parquet(files, columns=["chunk_id", "text"])
        # small inputs arrive as one block per file: split so the actor pool gets steady work
        ds = ds.repartition(max(len(files), math.ceil(total / 1024)))
        ds = ds.map_batches(
            Embedder,
            fn_constructor_kwargs=dict(
                model=embed.model,
                compute_dtype=embed.compute_dtype,
                batch_size=embed.batch_size,
                out_dtype=embed.dtype,
                threads=threads,
            ),
            batch_size=embed.gpu_batch_size if use_gpu else embed.batch_size * 4,
            compute=ray.data.ActorPoolStrategy(size=embed.num_actors),
            num_cpus=embed.cpus_per_actor,
            num_gpus=embed.gpus_per_actor or None,
            resources=resources,
        )
        # collect into per-shard arrays by chunk id (Ray Data may reorder blocks)
        arrays: dict[tuple[str, int], np.ndarray] = {}
        dim = None
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            vectors = (
                np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"]
            )
            dim = vectors.shape[1]
            for s in todo:
                sel = (batch["chunk_id"] >= s["chunk_start"]) & (batch["chunk_id"] < s["chunk_end"])
                if not sel.any():
                    continue
                key = (s["split"], s["shard"])
                if key not in arrays:
                    arrays[key] = np.zeros((s["chunk_end"] - s["chunk_start"], dim), dtype=embed.dtype)
                arrays[key][batch["chunk_id"][sel] - s["chunk_start"]] = vectors[sel]
        for s in todo:
            path = self.layout.embeddings(s["split"], s["shard"])
            chunking.save_npy_atomic(arrays[(s["split"], s["shard"])], path)
            self._record(path)
        self.stats["embed_seconds"] = time.perf_counter() - t0
        self.stats["chunks_per_second_embedding"] = total / self.stats["embed_seconds"]
        logger.info(
            "embeddings: %d chunks in %.1fs (%.0f chunks/s)",
            total,
            self.stats["embed_seconds"],
            self.stats["chunks_per_second_embedding"],
        )
        return int(dim)

    def index(self, plans, dim: int) -> dict[str, Any]:
        index_cfg = self.db.index
        sources = list(plans["train"]) + (list(plans["valid"]) if index_cfg.include_valid else [])
        n_total = sum(s["chunk_end"] - s["chunk_start"] for s in sources)
        factory = index_cfg.factory
        if factory == "auto":
            factory = choose_factory(n_total, dim, index_cfg.memory_budget_gb)
        trained_path = self.layout.root / "index" / "trained.faiss"
        emb_paths = [self.layout.embeddings(s["split"], s["shard"]) for s in sources]
        t0 = time.perf_counter()
        # the trained (empty) index stays valid when a shard is re-embedded: retrain only if it is missing
        if self._is_current(trained_path):
            trained = faiss.read_index(str(trained_path))
        else:
            rng = np.random.default_rng(0)
            per_shard = [
                max(1, round(index_cfg.train_sample * (s["chunk_end"] - s["chunk_start"]) / n_total))
                for s in sources
            ]
            sample = []
            for take, path in zip(per_shard, emb_paths, strict=True):
                vectors = np.load(path, mmap_mode="r")
                rows = np.sort(rng.choice(len(vectors), size=min(take, len(vectors)), replace=False))
                sample.append(np.asarray(vectors[rows], dtype=np.float32))
            trained = train_index(factory, np.concatenate(sample), use_gpu=index_cfg.use_gpu)
            trained_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = trained_path.with_name(".trained.faiss.tmp")
            faiss.write_index(trained, str(tmp))
            tmp.replace(trained_path)
            self._record(trained_path)
        shards = []
        for number, (s, emb_path) in enumerate(zip(sources, emb_paths, strict=True)):
            chunks_path = self.layout.chunks(s["split"], s["shard"])
            outputs = [
                self.layout.index(number),
                self.layout.shard_tokens(number),
                self.layout.shard_doc_ids(number),
            ]
            if not all(self._is_current(p, emb_path, chunks_path, trained_path) for p in outputs):
                index = fill_index(
                    trained, np.load(emb_path, mmap_mode="r"), index_cfg.add_block, index_cfg.use_gpu
                )
                tmp = outputs[0].with_name(f".{outputs[0].name}.tmp")
                faiss.write_index(index, str(tmp))
                tmp.replace(outputs[0])
                table = chunking.read_chunks(chunks_path, ["tokens", "doc_id"])
                chunking.save_npy_atomic(chunking.tokens_array(table, self.db.chunk_len), outputs[1])
                chunking.save_npy_atomic(table.column("doc_id").to_numpy().astype(np.int64), outputs[2])
                self._record(*outputs)
            shards.append(
                dict(
                    shard=number,
                    split=s["split"],
                    split_shard=s["shard"],
                    chunk_start=s["chunk_start"],
                    chunk_end=s["chunk_end"],
                    doc_start=s["doc_start"],
                    doc_end=s["doc_end"],
                    n_vectors=s["chunk_end"] - s["chunk_start"],
                )
            )
        self.stats["index_seconds"] = time.perf_counter() - t0
        logger.info(
            "index: %s over %d vectors in %d shards (%.1fs)",
            factory,
            n_total,
            len(shards),
            self.stats["index_seconds"],
        )
        return {
            "factory": factory,
            "requested": index_cfg.factory,
            "metric": "inner_product",
            "includes_valid": index_cfg.include_valid,
            "trained_file": self.layout.relative(trained_path),
            "shards": shards,
        }

    # ---- whole build -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._load_previous()
        t_start = time.perf_counter()
        corpus = load_documents(self.db.corpus)
        tokenizer = self.tokenizer(corpus)
        plans = self.plan(corpus, tokenizer)
        self.chunks(corpus, tokenizer, plans)
        dim = self.embeddings(plans)
        index_info = self.index(plans, dim)
        paths = [self.layout.tokenizer, self.layout.root / index_info["trained_file"]]
        for split in SPLITS:
            for s in plans[split]:
                paths += [self.layout.chunks(split, s["shard"]), self.layout.embeddings(split, s["shard"])]
        for s in index_info["shards"]:
            n = s["shard"]
            paths += [self.layout.index(n), self.layout.shard_tokens(n), self.layout.shard_doc_ids(n)]
        counts = self._counts(corpus, plans)
        files = self._files(paths)
        manifest = {
            "format_version": FORMAT_VERSION,
            "status": "complete",
            "db_id": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
            "fingerprint": build_fingerprint(self.config),
            "config": self.config.to_dict()["database"],
            "chunk_len": self.db.chunk_len,
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": files["tokenizer.json"],
                "vocab_size": tokenizer.get_vocab_size(),
                "pad_id": pad_id(tokenizer),
                "eod_id": eod_id(tokenizer),
            },
            "encoder": {
                "name": self.db.embed.model,
                "path": resolve_encoder_path(self.db.embed.model),
                "dim": dim,
                "dtype": self.db.embed.dtype,
            },
            "counts": counts,
            "splits": {
                split: [{k: v for k, v in s.items() if k != "local_docs"} for s in plans[split]]
                for split in SPLITS
            },
            "index": index_info,
            "files": files,
            "neighbors": self.previous.get("neighbors", {}) if not self.rebuilt else {},
        }
        write_manifest(self.layout, manifest)
        self.stats["total_seconds"] = time.perf_counter() - t_start
        logger.info(
            "database %s: %d documents, %d chunks, %d files rebuilt (%.1fs)",
            self.layout.root,
            counts["documents"]["train"] + counts["documents"]["valid"],
            counts["chunks"]["train"] + counts["chunks"]["valid"],
            len(self.rebuilt),
            self.stats["total_seconds"],
        )
        return manifest

    def _counts(self, corpus: Corpus, plans) -> dict[str, Any]:
        real = total = 0
        for split in SPLITS:
            for s in plans[split]:
                n_tokens = chunking.read_chunks(self.layout.chunks(split, s["shard"]), ["n_tokens"]).column(
                    "n_tokens"
                )
                real += int(np.asarray(n_tokens).sum())
                total += len(n_tokens) * self.db.chunk_len
        return {
            "documents_read": corpus.read,
            "documents_empty": corpus.empty,
            "documents": {split: len(corpus.split(split)) for split in SPLITS},
            "chunks": {
                split: sum(s["chunk_end"] - s["chunk_start"] for s in plans[split]) for split in SPLITS
            },
            "tokens": real,
            "padding_fraction": 1 - real / total if total else 0.0,
        }


def build_database(config: PlatformConfig) -> dict[str, Any]:
    """Build, resume or repair the database at ``config.db_path`` -> its manifest. Tracked in MLflow."""
    started = init_ray(config)
    try:
        builder = _Builder(config)
        with tracking.start_run(config, stage="build-db") as run:
            tracking.log_params(config.flatten())
            manifest = builder.run()
            metrics = dict(builder.stats)
            metrics.update({k: v for k, v in tracking.flatten_numbers(manifest["counts"]).items()})
            metrics["files_rebuilt"] = len(builder.rebuilt)
            tracking.log_metrics(metrics)
            tracking.set_tags({"db_id": manifest["db_id"], "index": manifest["index"]["factory"]})
            tracking.log_artifact(builder.layout.manifest)
            logger.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
        return manifest
    finally:
        if started:
            ray.shutdown()
