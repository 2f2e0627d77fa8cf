"""Does retrieval pay off? RETRO vs the same-size baseline, end to end through the platform.

    .venv/bin/python benchmarks/retrieval_gain.py --config wiki-full --corpus mirrored natural --seeds 0 1
    .venv/bin/python benchmarks/retrieval_gain.py --config debug --corpus mirrored --max-documents 200 \\
        --steps 20 --seeds 0                                # smoke test, a few minutes on 2 cores

Every stage is the platform's own, in one local Ray: ``build_database`` -> ``run_training`` of RETRO
and of the decoder-only baseline on the same sequences (``retro_platform.commands.demo.variant``: the runs
differ only in ``model.retrieval`` and ``train.name``) -> ``run_evaluation`` of both, one
``NeighborPool`` per database reused by training and evaluation, as ``retro demo`` does.

Corpora (``--corpus``, one table each):

- ``mirrored``: the first ``--max-documents`` packaged Wikipedia summaries, each twice
  (``database.corpus.mirror``: ``<id>`` and ``<id>#mirror``, all originals first and then all mirrors),
  so the two copies are far apart in chunk order and never in one training sequence (whose own
  documents the pool excludes). A chunk's twin is its best possible neighbour; a valid document can
  only find its twin when the twin fell into the train split (the index holds train chunks only
  unless ``database.index.include_valid``): the script reports how many did.
- ``shifted``: as ``mirrored``, but each mirror starts with a header of 1 to 40 words (a stable choice
  per document: ``database.corpus.mirror_header_words``), so a mirror's 64-token chunks start at
  another offset of the text than its original's: near-duplicates that do not line up with the chunk
  boundaries.
- ``natural``: the packaged Wikipedia summaries as they are (``--max-documents`` of them).

Per seed (``train.seed``): RETRO and the baseline at equal steps, a retro-fit of that baseline
(``train.init_from`` = its checkpoint, ``train.freeze=decoder``) for ``--retrofit-fraction`` of the
steps, then (unless ``--no-equal-time``) a
second baseline whose step count gives it RETRO's training time (RETRO's training seconds / the
baseline's seconds per step). Training seconds are the training loop's own time, summed from its
``tokens_per_s`` windows in MLflow (Ray Train start-up and the final checkpoint upload left out); the
wall time of each ``run_training`` call is in the JSON too.

Prints one table per corpus (valid bits per byte with retrieval, retrieval off, both baselines, the
ratios, tokens/s and training seconds per run, mean and spread over seeds, the targets; the
baseline's *copy floor*, its bits per byte if every valid token RETRO's neighbours contain were free,
which bounds what copying can gain on this data, and the share of that possible gain RETRO made) and, when
``run_evaluation`` returns per-overlap-bucket metrics (keys containing "overlap"), a second table of
them; appends both with the command, date, git head and machine to ``benchmarks/RESULTS-retrieval.md``
and writes the raw results as JSON next to the work dir. All runs of one invocation are one MLflow
experiment and comparison (``retrieval-gain-<time>``), printed by ``retro compare`` at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_model  # benchmarks/machine.py, next to this script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS-retrieval.md"
CORPORA = ("mirrored", "shifted", "natural")
MIRRORED = ("mirrored", "shifted")
"""Corpora whose documents each have a twin (``database.corpus.mirror``)."""
SHIFT_HEADER_WORDS = 40
"""``database.corpus.mirror_header_words`` of the shifted corpus: headers of 1-40 words (~1-60 tokens)."""

RESULTS_HEADER = """# Retrieval gain: RETRO vs the same-size baseline, end to end

Written by `benchmarks/retrieval_gain.py` (`make bench-retrieval`): the platform's own database build,
Ray Train runs of RETRO and of the decoder-only baseline on the same sequences (they differ only in
`model.retrieval`), and `run_evaluation` of each, in one local Ray; every run is in MLflow.

- **mirrored**: the packaged Wikipedia summaries, every document twice (`<id>` and `<id>#mirror`, all
  originals first, then all mirrors), so a chunk's best neighbour is its twin, far away in chunk order
  and never in the same training sequence. Only valid documents whose twin is in the train split can
  find it (the index holds train chunks only); each run reports how many. Targets: RETRO's valid bits
  per byte with retrieval <= 0.6x the baseline's, and RETRO with retrieval off within 3% of the
  baseline (retrieval, not a better decoder, makes the gain).
- **natural**: the packaged Wikipedia summaries as they are. Target: RETRO's valid bits per byte below
  the baseline's by more than the spread (max - min) over 2 seeds.

"baseline (= time)" is a second baseline trained for as long as RETRO took (more steps, since a
baseline step is cheaper). Training seconds are the training loop's own time.
"""

logger = logging.getLogger("bench.retrieval_gain")


# ---- corpora -----------------------------------------------------------------------------------------
def twin_counts(corpus: Any, include_valid: bool) -> dict[str, int]:
    """Valid documents of a mirrored ``Corpus``, and how many have their twin where retrieval finds it.

    The index holds the train split (plus the valid split with ``include_valid``); a valid document's
    twin is never in its own sequence.
    """
    from retro_platform.db.corpus import MIRROR_SUFFIX

    train = {d["id"] for d in corpus.train}
    valid = [d["id"] for d in corpus.valid]
    in_train = sum(
        (i.removesuffix(MIRROR_SUFFIX) if i.endswith(MIRROR_SUFFIX) else i + MIRROR_SUFFIX) in train
        for i in valid
    )
    return {
        "documents": len(train) + len(valid),
        "valid_documents": len(valid),
        "twin_in_train": in_train,
        "twin_in_valid": len(valid) - in_train,
        "twin_findable": len(valid) if include_valid else in_train,
    }


# ---- configs -----------------------------------------------------------------------------------------
def corpus_config(args: argparse.Namespace, corpus: str, stamp: str) -> tuple[Any, dict[str, Any]]:
    """The invocation's config for one corpus -> (PlatformConfig, corpus info).

    Starts from ``--config`` with ``--set`` overrides; sets the work dir, the corpus (the packaged
    Wikipedia, with ``database.corpus.mirror`` for the mirrored corpus), ``max_documents``, ``train.steps``, and the experiment and
    comparison every run of the invocation shares. The database folder is named by a hash of the
    database settings, so a corpus or setting change builds a new one instead of being refused.
    """
    from retro_platform.config import load_config
    from retro_platform.db.corpus import load_documents

    base = load_config(args.config, [*args.set, f"work_dir={args.work_dir}"])
    n = args.max_documents if args.max_documents is not None else base.database.corpus.max_documents
    overrides = [*args.set, f"work_dir={args.work_dir}", f"tracking.experiment={stamp}"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    info: dict[str, Any] = {"corpus": corpus, "source_documents": n}
    overrides += [
        "database.corpus.source=wikipedia",
        f"database.corpus.max_documents={n or 'null'}",
        f"database.corpus.mirror={str(corpus in MIRRORED).lower()}",  # whatever the preset says
        f"database.corpus.mirror_header_words={SHIFT_HEADER_WORDS if corpus == 'shifted' else 0}",
    ]
    config = load_config(args.config, overrides)
    digest = hashlib.sha1(
        json.dumps(dataclasses.asdict(config.database), sort_keys=True).encode()
    ).hexdigest()
    database = dataclasses.replace(config.database, path=f"db-{corpus}-{digest[:8]}")
    tracking = dataclasses.replace(config.tracking, comparison=stamp)
    info["include_valid"] = config.database.index.include_valid
    if corpus in MIRRORED:
        corpus_docs = load_documents(config.database.corpus, use_ray=False)
        info.update(twin_counts(corpus_docs, info["include_valid"]))
    return dataclasses.replace(config, database=database, tracking=tracking), info


def seeded(config: Any, corpus: str, seed: int, stamp: str) -> Any:
    """The config of one seed: ``train.seed`` and a run name unique to this invocation (no resuming)."""
    name = f"{config.train.name}-{corpus}-s{seed}-{stamp.removeprefix('retrieval-gain-')}"
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed, name=name))


# ---- runs --------------------------------------------------------------------------------------------
def tokens_per_step(config: Any) -> int:
    """Tokens of one optimizer step over all workers."""
    t = config.train
    return t.batch_size * t.seq_len * t.grad_accum * t.num_workers


def loop_seconds(config: Any, run_id: str) -> float | None:
    """The training loop's time: its ``tokens_per_s`` windows in MLflow turned back into seconds."""
    from mlflow import MlflowClient

    history = sorted(
        MlflowClient(config.tracking_uri).get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step
    )
    if not history:
        return None
    seconds, previous = 0.0, 0
    for metric in history:
        seconds += (metric.step - previous) * tokens_per_step(config) / metric.value
        previous = metric.step
    return seconds


def train_and_evaluate(config: Any, pool: Any) -> dict[str, Any]:
    """``run_training`` then ``run_evaluation`` of one variant -> its numbers (and the eval metrics)."""
    from retro_platform.commands.evaluate import run_evaluation
    from retro_platform.commands.train import run_training

    retro = config.model.retrieval
    t0 = time.perf_counter()
    trained = run_training(config, pool=pool if retro else None)
    wall = time.perf_counter() - t0
    seconds = loop_seconds(config, trained["run_id"]) or wall
    t1 = time.perf_counter()
    metrics = run_evaluation(config, checkpoint=trained["checkpoint"], pool=pool)
    return {
        "name": config.train.name,
        "run_id": trained["run_id"],
        "checkpoint": str(trained["checkpoint"]),
        "retrieval": retro,
        "steps": config.train.steps,
        "train_s": seconds,
        "wall_s": wall,
        "eval_s": time.perf_counter() - t1,
        "tokens_per_s": config.train.steps * tokens_per_step(config) / seconds,
        "eval": metrics,
    }


def run_corpus(args: argparse.Namespace, corpus: str, stamp: str) -> tuple[Any, dict[str, Any]]:
    """Build the corpus' database, then train and evaluate every variant of every seed -> (config, result)."""
    from retro_platform.commands.build_db import build_database
    from retro_platform.commands.demo import variant
    from retro_platform.neighbors.pool import NeighborPool
    from retro_platform.ray_utils import init_ray

    config, info = corpus_config(args, corpus, stamp)
    init_ray(config)  # no-op after the first corpus: one Ray for the whole invocation
    print(f"[{corpus}] building the database in {config.db_path}", flush=True)
    manifest = build_database(config)
    counts = manifest.counts
    info.update(
        preset=args.config,
        db=str(config.db_path),
        db_id=manifest.db_id,
        db_documents=counts.documents,
        db_chunks=counts.chunks,
        index=manifest.index.factory,
        steps=config.train.steps,
        tokens_per_step=tokens_per_step(config),
    )
    if config.train.neighbor_mode == "precomputed" and not manifest.neighbors:
        from retro_platform.commands.query_neighbors import precompute_neighbors

        precompute_neighbors(config)
    pool = NeighborPool.start(config, manifest)
    seeds: dict[int, dict[str, Any]] = {}
    try:
        for seed in args.seeds:
            run_config = seeded(config, corpus, seed, stamp)
            runs: dict[str, Any] = {}
            for kind in ("retro", "baseline"):
                print(f"[{corpus}] seed {seed}: {kind}, {run_config.train.steps} steps", flush=True)
                runs[kind] = train_and_evaluate(variant(run_config, kind, stamp), pool)
            if not args.no_equal_time:
                per_step = runs["baseline"]["train_s"] / runs["baseline"]["steps"]
                steps = max(1, round(runs["retro"]["train_s"] / per_step))
                timed = dataclasses.replace(
                    run_config, train=dataclasses.replace(run_config.train, steps=steps)
                )
                print(
                    f"[{corpus}] seed {seed}: baseline for RETRO's {runs['retro']['train_s']:.0f} s "
                    f"of training: {steps} steps",
                    flush=True,
                )
                runs["baseline_time"] = train_and_evaluate(
                    variant(timed, "baseline", stamp, "baseline-time"), pool
                )
            if args.retrofit_fraction > 0:
                steps = max(1, round(args.retrofit_fraction * run_config.train.steps))
                retrofit = dataclasses.replace(
                    run_config,
                    train=dataclasses.replace(
                        run_config.train,
                        steps=steps,
                        warmup_steps=min(run_config.train.warmup_steps, steps),
                        init_from=runs["baseline"]["checkpoint"],
                        freeze="decoder",
                    ),
                )
                print(f"[{corpus}] seed {seed}: retrofit of the baseline, {steps} steps", flush=True)
                runs["retrofit"] = train_and_evaluate(variant(retrofit, "retro", stamp, "retrofit"), pool)
            seeds[seed] = runs
    finally:
        pool.shutdown()
    return config, {"info": info, "seeds": seeds}


# ---- tables ------------------------------------------------------------------------------------------
COLUMNS = [
    ("RETRO bpb", "retro_bpb", "{:.4f}"),
    ("RETRO bpb, retrieval off", "retro_off_bpb", "{:.4f}"),
    ("baseline bpb (= steps)", "baseline_bpb", "{:.4f}"),
    ("baseline bpb (= time)", "baseline_time_bpb", "{:.4f}"),
    ("RETRO / baseline", "ratio", "{:.3f}x"),
    ("off / baseline", "off_ratio", "{:.3f}x"),
    ("RETRO / baseline (= time)", "ratio_time", "{:.3f}x"),
    ("copy floor / baseline", "floor_ratio", "{:.3f}x"),
    ("share of the floor's gain", "floor_share", "{:.0%}"),
    ("tokens/s RETRO", "retro_tps", "{:.0f}"),
    ("tokens/s baseline", "baseline_tps", "{:.0f}"),
    ("tokens/s baseline (= time)", "baseline_time_tps", "{:.0f}"),
    ("train s RETRO", "retro_s", "{:.1f}"),
    ("train s baseline", "baseline_s", "{:.1f}"),
    ("train s baseline (= time)", "baseline_time_s", "{:.1f}"),
    ("steps baseline (= time)", "baseline_time_steps", "{:.0f}"),
    ("retrofit bpb", "retrofit_bpb", "{:.4f}"),
    ("retrofit / baseline", "retrofit_ratio", "{:.3f}x"),
    ("retrofit steps", "retrofit_steps", "{:.0f}"),
]


def seed_row(runs: dict[str, Any]) -> dict[str, float | None]:
    """The table's values for one seed (None where a run was skipped)."""
    retro, base, timed = runs["retro"], runs["baseline"], runs.get("baseline_time")
    retrofit = runs.get("retrofit")
    row: dict[str, float | None] = {
        "retro_bpb": retro["eval"].get("valid_bpb_retrieval"),
        "retro_off_bpb": retro["eval"].get("valid_bpb_no_retrieval"),
        "baseline_bpb": base["eval"].get("valid_bpb_no_retrieval"),
        "floor_bpb": base["eval"].get("valid_bpb_no_retrieval_overlap_copy_floor"),
        "baseline_time_bpb": timed["eval"].get("valid_bpb_no_retrieval") if timed else None,
        "retro_tps": retro["tokens_per_s"],
        "baseline_tps": base["tokens_per_s"],
        "baseline_time_tps": timed["tokens_per_s"] if timed else None,
        "retro_s": retro["train_s"],
        "baseline_s": base["train_s"],
        "baseline_time_s": timed["train_s"] if timed else None,
        "baseline_time_steps": timed["steps"] if timed else None,
        "retrofit_bpb": retrofit["eval"].get("valid_bpb_retrieval") if retrofit else None,
        "retrofit_steps": retrofit["steps"] if retrofit else None,
    }

    def ratio(a: str, b: str) -> float | None:
        return row[a] / row[b] if row[a] is not None and row[b] else None

    row.update(
        ratio=ratio("retro_bpb", "baseline_bpb"),
        off_ratio=ratio("retro_off_bpb", "baseline_bpb"),
        ratio_time=ratio("retro_bpb", "baseline_time_bpb"),
        retrofit_ratio=ratio("retrofit_bpb", "baseline_bpb"),
        floor_ratio=ratio("floor_bpb", "baseline_bpb"),
    )
    possible = None if row["floor_bpb"] is None else row["baseline_bpb"] - row["floor_bpb"]
    gained = None if row["retro_bpb"] is None else row["baseline_bpb"] - row["retro_bpb"]
    row["floor_share"] = gained / possible if possible and gained is not None else None
    return row


def mean_and_spread(rows: list[dict[str, float | None]]) -> tuple[dict, dict]:
    """Per column: the mean over seeds, and the spread (max - min; None with one seed)."""
    mean, spread = {}, {}
    for _, key, _ in COLUMNS:
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = statistics.mean(values) if values else None
        spread[key] = max(values) - min(values) if len(values) > 1 else None
    return mean, spread


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def fmt(value: float | None, pattern: str) -> str:
    """A number with a column's pattern, or '-'."""
    return "-" if value is None else pattern.format(value)


def metric_text(value: Any) -> str:
    """An evaluation metric for a table: counts as integers, other numbers with 4 decimals, '-' if absent."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.4f}"
    return str(value)


def verdict(corpus: str, mean: dict, spread: dict, seeds: int) -> str:
    """Whether the corpus' target is met, in one line."""
    if mean["ratio"] is None:
        return "target: no RETRO bpb with retrieval to judge"
    if corpus in MIRRORED:
        met = mean["ratio"] <= 0.6
        off = mean["off_ratio"]
        off_met = off is not None and abs(off - 1) <= 0.03
        return (
            f"targets ({corpus}): RETRO <= 0.6x baseline: {mean['ratio']:.3f}x, "
            f"{'met' if met else 'not met'}; retrieval off within 3% of the baseline: "
            f"{fmt(None if off is None else 100 * (off - 1), '{:+.1f}%')}, {'met' if off_met else 'not met'}"
        )
    gap = mean["baseline_bpb"] - mean["retro_bpb"]
    if seeds < 2:
        return f"target (natural): baseline - RETRO = {gap:+.4f} bpb; needs >= 2 seeds to compare with the spread"
    noise = max(spread["retro_bpb"] or 0.0, spread["baseline_bpb"] or 0.0)
    return (
        f"target (natural): baseline - RETRO = {gap:+.4f} bpb vs spread over {seeds} seeds {noise:.4f}: "
        f"{'met' if gap > noise else 'not met'}"
    )


def corpus_report(corpus: str, result: dict[str, Any]) -> str:
    """The Markdown section of one corpus: setup line, the table, the target, the overlap table."""
    info, seeds = result["info"], result["seeds"]
    docs, chunks = info["db_documents"], info["db_chunks"]
    lines = [f"### {corpus} corpus", ""]
    setup = (
        f"preset `{info['preset']}`, {info['source_documents']} source documents"
        + (f" -> {info['documents']} with mirrors" if corpus in MIRRORED else "")
        + f"; database {docs.get('train', 0)} train / {docs.get('valid', 0)} valid documents, "
        f"{chunks.get('train', 0)} / {chunks.get('valid', 0)} chunks, index {info['index']} "
        f"({'train + valid' if info['include_valid'] else 'train chunks only'}); {info['steps']} steps of "
        f"{info['tokens_per_step']} tokens"
    )
    if corpus in MIRRORED:
        valid = info["valid_documents"]
        setup += (
            f"; valid documents whose twin is in the train split: {info['twin_in_train']} of {valid} "
            f"({100 * info['twin_in_train'] / max(1, valid):.0f}%), findable by retrieval: {info['twin_findable']}"
        )
    lines += [setup + ".", ""]
    rows = {seed: seed_row(runs) for seed, runs in seeds.items()}
    mean, spread = mean_and_spread(list(rows.values()))
    body = [[str(seed), *[fmt(row[key], p) for _, key, p in COLUMNS]] for seed, row in rows.items()]
    body.append(["mean", *[fmt(mean[key], p) for _, key, p in COLUMNS]])
    body.append(["spread (max - min)", *[fmt(spread[key], p) for _, key, p in COLUMNS]])
    lines += [markdown_table(["seed", *[c for c, _, _ in COLUMNS]], body), ""]
    lines += [verdict(corpus, mean, spread, len(rows)), ""]
    overlap = overlap_table(seeds)
    if overlap:
        lines += [
            "Per overlap bucket (`run_evaluation` metrics whose name contains `overlap`):",
            "",
            overlap,
            "",
        ]
    return "\n".join(lines)


def overlap_table(seeds: dict[int, dict[str, Any]]) -> str | None:
    """Evaluation metrics per overlap bucket (keys containing 'overlap'), one column per run; None if absent."""
    labels = {
        "retro": "RETRO",
        "baseline": "baseline",
        "baseline_time": "baseline (= time)",
        "retrofit": "retrofit",
    }
    runs = [(f"seed {s} {labels[k]}", r["eval"]) for s, by_kind in seeds.items() for k, r in by_kind.items()]
    keys = sorted({k for _, metrics in runs for k in metrics if "overlap" in k})
    if not keys:
        return None
    body = []
    for key in keys:
        values = [metrics.get(key) for _, metrics in runs]
        body.append([f"`{key}`", *[metric_text(v) for v in values]])
    return markdown_table(["metric", *[name for name, _ in runs]], body)


# ---- the record --------------------------------------------------------------------------------------
def git_head() -> str:
    """Short commit of the checkout, noting uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, dirty = (
            git("rev-parse", "--short", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no"),
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine_note(load_before: tuple[float, ...], note: str | None) -> str:
    """CPUs, CPU model, load averages before and after, and the caller's note."""
    model = cpu_model()
    after = os.getloadavg()
    text = (
        f"{os.cpu_count()} CPUs ({model or 'unknown model'}), load average (1 min) "
        f"{load_before[0]:.2f} before, {after[0]:.2f} after"
    )
    return text + (f"; {note}" if note else "")


def append_results(path: Path, section: str) -> None:
    """Append a section to the results file, creating it with its header first."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with open(path, "a") as f:
        f.write("\n" + section.rstrip() + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo", help="preset or YAML file (default: demo)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
    )
    parser.add_argument("--corpus", nargs="+", choices=CORPORA, default=["mirrored"], help="corpora to run")
    parser.add_argument(
        "--max-documents", type=int, default=None, help="first N source documents (default: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-time baseline")
    parser.add_argument(
        "--retrofit-fraction",
        type=float,
        default=0.25,
        help="also retro-fit each seed's baseline (train.init_from + train.freeze=decoder) for this "
        "fraction of the steps; 0 skips it",
    )
    parser.add_argument("--work-dir", default="work/retrieval-gain", help="work_dir of every run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the tables go to")
    parser.add_argument("--note", default=None, help="free text for the machine note (e.g. what else ran)")
    args = parser.parse_args(argv)
    if args.max_documents is not None and args.max_documents < 1:
        parser.error("--max-documents must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    args.corpus = list(dict.fromkeys(args.corpus))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every corpus and seed, print the tables, append them to the results file, write the JSON."""
    args = parse_args(argv)
    from retro_platform.output import configure_output

    configure_output(verbose=False, native_stderr=argv is None)  # the `retro` commands' quiet output
    import ray

    from retro_platform.commands.compare import compare_experiment
    from retro_platform.db.corpus import wikipedia_summaries_path
    from retro_platform.errors import RetroError

    command = shlex.join([".venv/bin/python", "benchmarks/retrieval_gain.py", *sys.argv[1:]])
    now = datetime.datetime.now().astimezone()
    stamp = f"retrieval-gain-{now:%Y%m%d-%H%M%S}"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        wikipedia_summaries_path()  # a clear error before Ray starts if the packaged corpus is missing
        for corpus in args.corpus:
            last_config, results[corpus] = run_corpus(args, corpus, stamp)
        print("\nall runs of this invocation side by side (retro compare):\n")
        compare_experiment(last_config, comparison=stamp)
    except (RetroError, ValueError, FileNotFoundError) as exc:
        logger.debug("details", exc_info=True)
        print(f"retrieval_gain: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    # the raw results first: a failure in the report below must not lose an hour of runs
    out = Path(last_config.work_dir)
    json_path = out.parent / f"{out.name}-{now:%Y%m%d-%H%M%S}.json"
    record = {
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "git_head": git_head(),
        "machine": machine_note(load_before, args.note),
        "wall_s": wall,
        "experiment": stamp,
        "tracking_uri": last_config.tracking_uri,
        "corpora": {
            corpus: {"info": r["info"], "seeds": {str(s): runs for s, runs in r["seeds"].items()}}
            for corpus, r in results.items()
        },
    }
    json_path.write_text(json.dumps(record, indent=2, default=str))
    section = "\n".join(
        [
            f"## {now:%Y-%m-%d %H:%M %Z}, head {git_head()}",
            "",
            "```bash",
            command,
            "```",
            "",
            f"machine: {machine_note(load_before, args.note)}; wall time {wall / 60:.1f} min.",
            f"MLflow: experiment and comparison `{stamp}` in `{last_config.tracking_uri}`.",
            "",
            *[corpus_report(corpus, result) for corpus, result in results.items()],
        ]
    )
    print("\n" + section)
    append_results(args.results, section)
    print(f"\nappended to {args.results}; raw results in {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
