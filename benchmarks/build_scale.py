"""How the streaming database build scales: synthetic corpora of ~10k, ~100k and ~1M chunks.

    nice -n 10 .venv/bin/python benchmarks/build_scale.py [--sizes 10000,100000,1000000]
        [--chunks-per-shard 5000] [--piece-mb 1] [--index Flat] [--json out.json]
    nice -n 10 .venv/bin/python benchmarks/build_scale.py --shard-sizes 10000,100000,1000000
        [--piece-mb 16] [--index IVF256,PQ16] [--json out.json]
    .venv/bin/python benchmarks/build_scale.py --report out.json     # reprint a saved run

``--shard-sizes``: one database per size with ONE train shard of that many chunks (plus a valid shard
of ~5% of it), so every build task handles a whole shard of that size: the largest build worker's
peak RSS and the driver's peak RSS are compared with the smallest size's (targets: worker within
+300 MB, driver within +200 MB). The index is IVF-PQ (``--index``, default ``IVF256,PQ16``: 24 bytes
per vector), because a Flat index of a 1M-chunk shard is 1.5 GB by itself; the index codes are the
only per-shard state a streaming build worker holds.

Not a timed test: a script that prints a table. For each size it writes a deterministic synthetic
JSON Lines corpus (documents of ~3 chunks of Zipf-distributed pseudo-words; the small corpora are
prefixes of the big ones) into a temporary folder and builds it with ``build_database`` on a local
Ray (``ray.num_cpus=2``, 1 GB object store, dashboard off), one size per child process so every size
starts from a fresh driver and a fresh Ray. Held fixed across sizes, so the per-task work is the same
at every size: the reader piece (``database.corpus.piece_mb``, small so even the 10k corpus is read in
several pieces) and the shard size (``database.num_shards`` = chunks / ``--chunks-per-shard``: the
shard count grows with the corpus, each shard stays ~the same size).

The encoder is the benchmark-only STAND-IN ``stand-in:hashed-tokens`` (``retro_platform.db.embed``:
vectors hashed from the text's byte 4-grams, ~100k chunks/s per core, no torch), because the real
MiniLM encodes ~100-300 chunks/s on these 2 cores (a 1M-chunk build would take hours); the real
encoder's rate inside the stage is what ``benchmarks/embed.py`` measures. Embedding times below are
the stage's plumbing (read chunk texts, write vectors), not an encoder's.

Reported per size:

* the stage times of the build's MLflow run (``corpus_seconds`` ... ``index_seconds``, ``total_seconds``)
  and ``build_database``'s wall time (Ray start and the MLflow run included);
* time per chunk and its ratio to the smallest size (1.0 = linear);
* driver: peak RSS of this (child) process sampled every ``--interval`` s by a background thread, its
  growth over the RSS just before the build, the process's CPU seconds (user + system, all its
  threads, minus the sampler's own), and per stage (each pipeline stage function wrapped here, not
  edited) the driver's CPU seconds and peak RSS, and the time spent writing partial manifests
  (``Ledger.checkpoint``, called in the driver as output files are recorded);
* workers: peak RSS of every process of the Ray session other than the driver (the driver's
  descendants: Ray's system processes, and the workers under the raylet, named by their
  ``ray::<task>`` title), the largest single worker (and the task it ran at its peak), the largest
  sum over all workers at one instant, and Ray's system processes (gcs_server, raylet, ...).
  RSS counts the shared object-store pages a process touched.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("benchmarks.build_scale")

ENCODER_NOTE = "STAND-IN encoder 'stand-in:hashed-tokens' (benchmark only: hashed byte 4-grams, not MiniLM)"
CHUNKS_PER_DOC = 3.10
"""Measured mean chunks per synthetic document (64-token chunks, BPE 8192): sizes the corpora."""
WORDS = (40, 200)
"""Words per document (uniform): ~3 chunks of 64 tokens on average."""
DOC_BLOCK = 1000
"""Documents generated per random draw: corpora are prefixes of each other at multiples of it."""
VALID_FRACTION = 0.05
"""Share of the documents in the valid split."""
STAGES = ("corpus", "tokenizer", "plan", "chunk", "embed", "index")
"""Stage times the build logs to MLflow (``<stage>_seconds``)."""
WRAPPED = {
    "stage_documents": "documents",
    "prepare_tokenizer": "tokenizer",
    "plan_shards": "plan",
    "check_index_trainable": "checks",
    "write_chunks": "chunks",
    "write_embeddings": "embeddings",
    "build_index": "index",
    "write_manifest": "manifest",
}
"""Functions of ``retro_platform.db.build.pipeline`` timed in the driver, and the stage they are."""


# ---- the corpus -------------------------------------------------------------------------------------
def vocabulary(size: int = 20_000, seed: int = 1) -> list[str]:
    """Deterministic pseudo-words of 1-4 syllables (most frequent first)."""
    rng = np.random.default_rng(seed)
    onsets = [*"bcdfghklmnprstvwz", "st", "tr", "ch", "sh", "br", "pl", "gr", ""]
    vowels = [*"aeiou", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        syllables = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.4, 0.2, 0.1]))
        word = "".join(
            onsets[rng.integers(len(onsets))]
            + vowels[rng.integers(len(vowels))]
            + codas[rng.integers(len(codas))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> int:
    """Write ``n_docs`` synthetic documents as JSON Lines (streamed, bounded memory) -> bytes written.

    Zipf-distributed words (s = 1.05), a full stop after ~1 word in 12; ids ``doc-00000000``..."""
    words = vocabulary()
    table = np.array(words + [w + "." for w in words], dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 2.7) ** 1.05
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n_docs, DOC_BLOCK):
            lengths = rng.integers(WORDS[0], WORDS[1] + 1, DOC_BLOCK)
            picks = rng.choice(len(words), size=int(lengths.sum()), p=weights)
            picks += len(words) * (rng.random(len(picks)) < 1 / 12)
            ends = np.cumsum(lengths)
            for i in range(min(DOC_BLOCK, n_docs - start)):
                text = " ".join(table[picks[ends[i] - lengths[i] : ends[i]]])
                doc = start + i
                f.write(json.dumps({"id": f"doc-{doc:08d}", "title": f"Document {doc}", "text": text}) + "\n")
    return path.stat().st_size


# ---- measuring --------------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Samples the driver's RSS and every Ray session process's RSS (the driver's descendants)."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.driver = psutil.Process()
        self.stage = "outside"  # set by the stage wrappers
        self.driver_peak = 0
        self.stage_peaks: dict[str, int] = {}
        self.worker_peak = (0, "", 0)  # rss, task title at the peak, pid
        self.workers_sum_peak = 0
        self.workers_seen: set[int] = set()
        self.task_peaks: dict[str, int] = {}  # ray::<task or actor> title -> peak RSS of a worker showing it
        self.system_peaks: dict[str, int] = {}
        self.samples = 0
        self.loads: list[float] = []  # 1-minute load average at each sample
        self.cpu_seconds = 0.0  # this thread's own CPU time
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            t0 = time.thread_time()
            self.sample()
            self.cpu_seconds += time.thread_time() - t0
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def sample(self) -> None:
        psutil = self.psutil
        with self._lock:
            rss = self.driver.memory_info().rss
            self.driver_peak = max(self.driver_peak, rss)
            self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), rss)
            total = 0
            for proc in self.driver.children(recursive=True):
                try:
                    mem = proc.memory_info().rss
                    cmd = proc.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                title = cmd[0] if cmd else proc.name()
                script = next((c for c in cmd[1:3] if c.endswith(".py")), "")
                if title.startswith("ray::") or script.endswith("default_worker.py"):
                    task = title.split()[0] if title.startswith("ray::") else "ray::(starting)"
                    total += mem
                    self.workers_seen.add(proc.pid)
                    self.task_peaks[task] = max(self.task_peaks.get(task, 0), mem)
                    if mem > self.worker_peak[0]:
                        self.worker_peak = (mem, task, proc.pid)
                else:
                    name = Path(script or title).name
                    self.system_peaks[name] = max(self.system_peaks.get(name, 0), mem)
            self.workers_sum_peak = max(self.workers_sum_peak, total)
            self.samples += 1
            self.loads.append(os.getloadavg()[0])


def process_cpu() -> float:
    """User + system CPU seconds of this process (every thread)."""
    times = os.times()
    return times.user + times.system


def wrap_stages(sampler: Sampler, stats: dict[str, dict[str, float]]) -> None:
    """Time the build's stage functions in the driver (wall, driver CPU) and tag RSS samples with the
    stage; count and time the partial-manifest writes. Patches module attributes, edits no file."""
    from retro_platform.db.build import ledger as ledger_module
    from retro_platform.db.build import pipeline

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            outer = sampler.stage
            sampler.stage = name
            wall, cpu = time.perf_counter(), process_cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = stats.setdefault(name, {"wall": 0.0, "cpu": 0.0, "calls": 0})
                entry["wall"] += time.perf_counter() - wall
                entry["cpu"] += process_cpu() - cpu
                entry["calls"] += 1
                sampler.stage = outer

        return wrapper

    for attr, name in WRAPPED.items():
        if hasattr(pipeline, attr):
            setattr(pipeline, attr, timed(name, getattr(pipeline, attr)))
        else:
            logger.warning("pipeline.%s not found: stage %s is not timed in the driver", attr, name)
    checkpoint = ledger_module.Ledger.checkpoint

    @functools.wraps(checkpoint)
    def timed_checkpoint(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), process_cpu()
        try:
            return checkpoint(self, *args, **kwargs)
        finally:
            entry = stats.setdefault("checkpoints", {"wall": 0.0, "cpu": 0.0, "calls": 0})
            entry["wall"] += time.perf_counter() - wall
            entry["cpu"] += process_cpu() - cpu
            entry["calls"] += 1

    ledger_module.Ledger.checkpoint = timed_checkpoint


def build_metrics(config) -> dict[str, float]:
    """Metrics of the latest build-db run in the config's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'build-db'", max_results=1)
    return dict(runs[0].data.metrics)


def code_version() -> str:
    """The commit measured, and how many files under retro_platform/ differ from it (a shared tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "retro_platform"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" + {len(changed)} uncommitted: {', '.join(changed)}" if changed else "")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(target: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate the corpus of ``target`` chunks and build it in this process -> the measurements."""
    from retro_platform.commands.build_db import build_database
    from retro_platform.config import load_config
    from retro_platform.db.corpus import corpus_pieces
    from retro_platform.db.embed import STAND_IN_ENCODER

    tmp = Path(tempfile.mkdtemp(prefix=f"build-scale-{target}-", dir=args.tmp))
    corpus = tmp / "corpus.jsonl"
    n_docs = max(1, round(target / CHUNKS_PER_DOC))
    t0 = time.perf_counter()
    corpus_bytes = write_corpus(corpus, n_docs)
    generate_seconds = time.perf_counter() - t0
    shards = args.num_shards or max(1, round(target / args.chunks_per_shard))
    overrides = [
        f"work_dir={tmp / 'work'}",
        "ray.num_cpus=2",
        "ray.object_store_memory_gb=1.0",
        "ray.include_dashboard=false",
        "database.path=db",
        f"database.num_shards={shards}",
        f"database.corpus.source={corpus}",
        "database.corpus.max_documents=null",
        f"database.corpus.valid_fraction={VALID_FRACTION}",
        f"database.corpus.piece_mb={args.piece_mb}",
        "database.tokenizer.vocab_size=8192",
        f"database.embed.model={STAND_IN_ENCODER}",
        f"database.embed.num_actors={args.actors}",
        "database.embed.cpus_per_actor=0.5",
        f"database.index.factory={args.index}",
        "tracking.experiment=build-scale",
    ]
    config = load_config("debug", overrides)
    pieces = len(corpus_pieces(str(corpus), int(args.piece_mb * 1024**2)))
    buckets = {"train": shards, "valid": -(-shards // 4)}  # as documents.bucket_counts for a given num_shards

    sampler = Sampler(args.interval)
    stage_stats: dict[str, dict[str, float]] = {}
    wrap_stages(sampler, stage_stats)
    import gc

    gc.collect()
    baseline = sampler.driver.memory_info().rss
    load_before = os.getloadavg()[0]
    sampler.start()
    cpu0, t0 = process_cpu(), time.perf_counter()
    manifest = build_database(config)
    wall = time.perf_counter() - t0
    driver_cpu = process_cpu() - cpu0
    sampler.stop()
    load_after = os.getloadavg()[0]
    metrics = build_metrics(config)
    db_bytes = folder_bytes(Path(config.db_path))
    chunks = sum(manifest.counts.chunks.values())
    result = {
        "target": target,
        "code": code_version(),
        "encoder": ENCODER_NOTE,
        "index": manifest.index.factory,
        "documents": sum(manifest.counts.documents.values()),
        "chunks": chunks,
        "chunks_train": manifest.counts.chunks.get("train", 0),
        "tokens": manifest.counts.tokens,
        "shards_train": len(manifest.splits["train"]),
        "shards_valid": len(manifest.splits["valid"]),
        "buckets": buckets,
        "pieces": pieces,
        "staged_files_max": pieces * sum(buckets.values()),
        "corpus_mb": corpus_bytes / 1e6,
        "db_mb": db_bytes / 1e6,
        "generate_seconds": generate_seconds,
        "wall_seconds": wall,
        "stage_seconds": {s: metrics.get(f"{s}_seconds", float("nan")) for s in STAGES},
        "total_seconds": metrics.get("total_seconds", float("nan")),
        "driver_baseline_mb": baseline / 1e6,
        "driver_peak_mb": sampler.driver_peak / 1e6,
        "driver_cpu_seconds": driver_cpu - sampler.cpu_seconds,
        "sampler_cpu_seconds": sampler.cpu_seconds,
        "driver_stages": {
            name: {**entry, "peak_mb": sampler.stage_peaks.get(name, 0) / 1e6}
            for name, entry in stage_stats.items()
        },
        "driver_outside_peak_mb": sampler.stage_peaks.get("outside", 0) / 1e6,
        "worker_peak_mb": sampler.worker_peak[0] / 1e6,
        "worker_peak_task": sampler.worker_peak[1],
        "workers_sum_peak_mb": sampler.workers_sum_peak / 1e6,
        "workers_seen": len(sampler.workers_seen),
        "task_peaks_mb": {k: v / 1e6 for k, v in sorted(sampler.task_peaks.items(), key=lambda kv: -kv[1])},
        "system_peaks_mb": {k: v / 1e6 for k, v in sorted(sampler.system_peaks.items())},
        "samples": sampler.samples,
        "load_before": load_before,
        "load_mean": float(np.mean(sampler.loads)),
        "load_max": float(np.max(sampler.loads)),
        "load_after": load_after,
    }
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---- the report -------------------------------------------------------------------------------------
def print_report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The table and the scaling summary."""
    print(f"\nencoder: {ENCODER_NOTE}")
    print(f"code: {results[-1].get('code', 'unknown')}")
    print(
        f"index {results[0]['index']}; Ray num_cpus=2, object store 1 GB, dashboard off; "
        f"piece_mb={args.piece_mb}, "
        + (
            "one train shard per build (--shard-sizes); "
            if results[0].get("shard_mode")
            else f"~{args.chunks_per_shard} chunks per train shard (num_shards = chunks / {args.chunks_per_shard}); "
        )
        + f"{args.actors} encoder actors x 0.5 CPU"
    )
    print("\nstage seconds (MLflow metrics of the build run):\n")
    head = ["chunks", "docs", "shards t+v", "pieces"] + list(STAGES) + ["build", "wall", "us/chunk", "ratio"]
    print_header(head)
    base = results[0]["wall_seconds"] / results[0]["chunks"]
    for r in results:
        per = r["wall_seconds"] / r["chunks"]
        cells = [
            f"{r['chunks']:,}",
            f"{r['documents']:,}",
            f"{r['shards_train']}+{r['shards_valid']}",
            str(r["pieces"]),
            *(f"{r['stage_seconds'][s]:.1f}" for s in STAGES),
            f"{r['total_seconds']:.1f}",
            f"{r['wall_seconds']:.1f}",
            f"{per * 1e6:.0f}",
            f"{per / base:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nmemory (MB RSS) and driver CPU:\n")
    head = [
        "chunks",
        "driver before",
        "driver peak",
        "driver growth",
        "driver CPU s",
        "CPU s / 100k chunks",
        "checkpoints (n, s)",
        "worker peak (task)",
        "workers sum peak",
        "gcs / raylet peak",
    ]
    print_header(head)
    for r in results:
        ck = r["driver_stages"].get("checkpoints", {"calls": 0, "wall": 0.0})
        sysp = r["system_peaks_mb"]
        cells = [
            f"{r['chunks']:,}",
            f"{r['driver_baseline_mb']:.0f}",
            f"{r['driver_peak_mb']:.0f}",
            f"+{r['driver_peak_mb'] - r['driver_baseline_mb']:.0f}",
            f"{r['driver_cpu_seconds']:.1f}",
            f"{r['driver_cpu_seconds'] / r['chunks'] * 1e5:.1f}",
            f"{int(ck['calls'])}, {ck['wall']:.1f}",
            f"{r['worker_peak_mb']:.0f} ({r['worker_peak_task']})",
            f"{r['workers_sum_peak_mb']:.0f}",
            f"{sysp.get('gcs_server', 0):.0f} / {sysp.get('raylet', 0):.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nlargest worker RSS (MB) seen under each Ray process title (task / actor; IDLE = between tasks):")
    for r in results:
        tops = sorted(r["task_peaks_mb"].items(), key=lambda kv: -kv[1])[:8]
        print(f"  {r['chunks']:>9,}: " + ", ".join(f"{k.removeprefix('ray::')} {v:.0f}" for k, v in tops))
    print("\ndriver per stage (wall s / driver CPU s / peak RSS MB):\n")
    names = list(WRAPPED.values()) + ["checkpoints"]
    print("| chunks | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for r in results:
        cells = [f"{r['chunks']:,}"]
        for name in names:
            e = r["driver_stages"].get(name)
            peak = f" / {e['peak_mb']:.0f}" if e and e.get("peak_mb") else ""
            cells.append(f"{e['wall']:.1f} / {e['cpu']:.1f}{peak}" if e else "-")
        print("| " + " | ".join(cells) + " |")
    first, last = results[0], results[-1]
    if len(results) > 1:
        grow = last["chunks"] / first["chunks"]
        print(
            f"\n{first['chunks']:,} -> {last['chunks']:,} chunks (x{grow:.0f}): wall x"
            f"{last['wall_seconds'] / first['wall_seconds']:.1f}, build total x"
            f"{last['total_seconds'] / first['total_seconds']:.1f}; driver peak RSS "
            f"{last['driver_peak_mb'] - first['driver_peak_mb']:+.0f} MB (target within +200 MB); "
            f"largest worker {first['worker_peak_mb']:.0f} -> {last['worker_peak_mb']:.0f} MB"
        )
        if len(results) >= 2:  # marginal cost from the two largest sizes: projects a bigger corpus
            a, b = results[-2], results[-1]
            marginal = (b["wall_seconds"] - a["wall_seconds"]) / (b["chunks"] - a["chunks"])
            fixed = b["wall_seconds"] - marginal * b["chunks"]
            measured = max(r["chunks"] for r in results)
            sizes = [n for n in (1_000_000, 10_000_000) if n > measured * 1.05]
            print(
                f"marginal {marginal * 1e6:.0f} us/chunk between the two largest sizes, fixed ~{fixed:.0f} s; "
                "linear projection (same machine, stand-in encoder; an underestimate wherever a stage grows "
                "faster than linearly): "
                + ", ".join(f"{n:,} chunks ~{(fixed + marginal * n) / 60:.0f} min" for n in sizes)
            )
    if len(results) > 1:
        print("\nper stage, time ratio between consecutive sizes (1.0 x chunk ratio = linear):")
        for a, b in zip(results, results[1:], strict=False):
            grow = b["chunks"] / a["chunks"]
            cells = [f"{s} x{b['stage_seconds'][s] / max(a['stage_seconds'][s], 1e-9):.1f}" for s in STAGES]
            print(f"  {a['chunks']:,} -> {b['chunks']:,} (x{grow:.1f} chunks): " + ", ".join(cells))
    loads = ", ".join(
        f"{r['load_before']:.1f}->{r['load_after']:.1f} (mean {r['load_mean']:.1f}, max {r['load_max']:.1f})"
        for r in results
    )
    print(f"load average (1 min) before->after each build, sampled during it: {loads}")
    print("(2 = these 2 cores fully used by this benchmark alone; more = other jobs shared them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="target chunks per corpus")
    parser.add_argument("--chunks-per-shard", type=int, default=5000, help="chunks per train shard")
    parser.add_argument("--piece-mb", type=float, default=1.0, help="database.corpus.piece_mb")
    parser.add_argument(
        "--index", default=None, help="database.index.factory (default Flat; IVF256,PQ16 with --shard-sizes)"
    )
    parser.add_argument(
        "--shard-sizes",
        default=None,
        help="chunks per shard, e.g. 10000,100000,1000000: one train shard of each size (compares the "
        "largest build worker's and the driver's peak RSS with the smallest size's)",
    )
    parser.add_argument("--num-shards", type=int, default=None, help=argparse.SUPPRESS)  # child: fixed
    parser.add_argument("--actors", type=int, default=2, help="encoder actors (0.5 CPU each)")
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling period, seconds")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpora and databases")
    parser.add_argument("--keep", action="store_true", help="keep each size's corpus and database")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--report", default=None, help="print the report of a --json file, build nothing")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    args = parser.parse_args()
    from retro_platform.output import configure_output

    configure_output(verbose=False, native_stderr=True)  # the `retro` commands' quiet output
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    if args.index is None:
        args.index = "IVF256,PQ16" if args.shard_sizes else "Flat"
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print_report(results, args)
        if results and results[0].get("shard_mode"):
            print_shard_report(results)
        return
    results = []
    runs = [(int(s), None) for s in args.sizes.split(",")]
    if args.shard_sizes:  # one train shard of each size; the valid split takes VALID_FRACTION more
        runs = [(math.ceil(int(s) / (1 - VALID_FRACTION)), 1) for s in args.shard_sizes.split(",")]
    for target, num_shards in runs:
        command = [sys.executable, __file__, "--one", str(target)]
        command += ["--num-shards", str(num_shards)] if num_shards else []
        for flag in ("chunks_per_shard", "piece_mb", "index", "actors", "interval", "tmp"):
            value = getattr(args, flag)
            if value is not None:
                command += [f"--{flag.replace('_', '-')}", str(value)]
        command += ["--keep"] if args.keep else []
        logger.info("size %d: %s", target, " ".join(command))
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"size {target} failed (exit {proc.returncode}); its log is above")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        r = results[-1]
        r["shard_mode"] = bool(num_shards)
        logger.info(
            "size %d: %d chunks in %.1f s, driver peak %.0f MB, worker peak %.0f MB",
            target,
            r["chunks"],
            r["wall_seconds"],
            r["driver_peak_mb"],
            r["worker_peak_mb"],
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_report(results, args)
    if args.shard_sizes:
        print_shard_report(results)


def print_shard_report(results: list[dict[str, Any]]) -> None:
    """Peak RSS of the largest build worker and of the driver per shard size, against the smallest."""
    print(
        "\nshard sizes: one train shard per build; embeddings from the benchmark STAND-IN encoder "
        "(hashed byte 4-grams, not MiniLM: a 1M-chunk MiniLM encode takes hours here) through the "
        "build's real embedding actors, Parquet/.npy writers and FAISS fill"
    )
    print(f"machine: {machine_line()}\n")
    head = [
        "train shard (chunks)",
        "index",
        "largest worker MB (task)",
        "vs smallest",
        "driver MB",
        "vs smallest",
    ]
    print_header(head)
    base = results[0]
    for r in results:
        cells = [
            f"{r['chunks_train']:,}",
            r["index"],
            f"{r['worker_peak_mb']:.0f} ({r['worker_peak_task'].removeprefix('ray::')})",
            f"{r['worker_peak_mb'] - base['worker_peak_mb']:+.0f}",
            f"{r['driver_peak_mb']:.0f}",
            f"{r['driver_peak_mb'] - base['driver_peak_mb']:+.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    worker = max(r["worker_peak_mb"] for r in results) - base["worker_peak_mb"]
    driver = max(r["driver_peak_mb"] for r in results) - base["driver_peak_mb"]
    print(
        f"largest worker {worker:+.0f} MB (target within +300 MB: {'met' if worker <= 300 else 'MISSED'}), "
        f"driver {driver:+.0f} MB (target within +200 MB: {'met' if driver <= 200 else 'MISSED'})"
    )


def print_header(head: list[str]) -> None:
    """A Markdown table's header row and separator."""
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))


def machine_line() -> str:
    """CPU model and cores of this machine."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
