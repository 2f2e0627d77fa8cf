"""Does the model read its neighbours? Fast, seeded ablations of the retrieval path, in one process.

Two kinds of experiment (``retro_model`` only: no Ray, no index, so a variant costs minutes):

- ``copy``: the synthetic copy tasks of ``retro_model.copy_tasks`` (``aligned``: the copy in
  neighbour slot 0; ``hidden``: the copy in a random one of 3 slots). Prints the held-out loss at
  positions >= m-1 with retrieval and for the same model trained with retrieval off (chance: ln(V-1)).
- ``mirror``: real text with an oracle database: the packaged Wikipedia summaries, tokenized with a
  BPE trained on them, cut into 64-token chunks and read as the platform does (runs of consecutive
  chunks); neighbour 0 of each chunk is the same text + its continuation (what a mirrored corpus
  returns first, at score 1.000), neighbour 1 a random chunk + continuation. RETRO and the baseline
  train on the same sequences; every ``--eval-every`` steps the valid loss with retrieval, with
  retrieval off and the baseline's are printed: the gap curve.

Each result is one JSON line (appended to ``--out`` when given). Examples::

    python benchmarks/retrieval_ablations.py copy --task aligned --steps 400 --cross-positions none rotary
    python benchmarks/retrieval_ablations.py mirror --steps 600 --cross-positions relative
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retro_model.config import CROSS_POSITIONS, RetroConfig  # noqa: E402
from retro_model.copy_tasks import TASKS, copy_task_config, train_copy_task  # noqa: E402
from retro_model.model import Retro  # noqa: E402


def parse_overrides(pairs: list[str]) -> dict:
    """key=value model overrides; values are JSON (numbers, true/false, lists) or else strings."""
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def emit(record: dict, out: str | None) -> None:
    """Print a result line and append it to ``out``."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run_copy(args: argparse.Namespace) -> None:
    """Copy-task ablation: each cross-position scheme, with retrieval and as a baseline."""
    task = TASKS[args.task]
    overrides = parse_overrides(args.set)
    for seed in args.seeds:
        baseline = train_copy_task(
            task, copy_task_config(task, retrieval=False, **overrides), args.steps, seed, lr=args.lr
        )
        for scheme in args.cross_positions:
            config = copy_task_config(task, cross_positions=scheme, **overrides)
            result = train_copy_task(task, config, args.steps, seed, lr=args.lr)
            emit(
                {
                    "experiment": "copy",
                    "task": args.task,
                    "cross_positions": scheme,
                    "overrides": overrides,
                    "seed": seed,
                    "steps": args.steps,
                    "lr": args.lr,
                    "loss": round(result["loss"], 4),
                    "baseline_loss": round(baseline["loss"], 4),
                    "chance": round(task.chance_nats, 4),
                    "curve": [(s, round(v, 3)) for s, v in result["curve"]],
                    "seconds": round(result["seconds"], 1),
                },
                args.out,
            )


# ---- mirror: real text with an oracle database -------------------------------------------------------
class OracleMirror:
    """Chunked Wikipedia text whose neighbour 0 is always the chunk itself (+ continuation)."""

    def __init__(self, max_documents: int | None, vocab_size: int, chunk_len: int, seq_len: int, seed: int):
        from retro_platform.config import CorpusConfig, TokenizerConfig
        from retro_platform.db.chunk import document_token_ids
        from retro_platform.db.corpus import load_documents
        from retro_platform.db.tokenizer import train_tokenizer

        corpus = load_documents(CorpusConfig(max_documents=max_documents, valid_fraction=0.05), use_ray=False)
        tokenizer = train_tokenizer((d["text"] for d in corpus.train), TokenizerConfig(vocab_size=vocab_size))
        self.vocab_size = tokenizer.get_vocab_size()
        self.m = chunk_len
        self.l = seq_len // chunk_len
        self.rng = np.random.default_rng(seed)
        self.splits = {}
        for name in ("train", "valid"):
            texts = [d["text"] for d in corpus.split(name)]
            chunks, continuation = [], []
            for ids in document_token_ids(texts, tokenizer):
                pieces = [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]
                pieces = [p + [0] * (chunk_len - len(p)) for p in pieces]
                chunks += pieces
                continuation += pieces[1:] + [[0] * chunk_len]
            chunks, continuation = np.array(chunks, np.int64), np.array(continuation, np.int64)
            self.splits[name] = (chunks, np.concatenate([chunks, continuation], axis=1))
        self.tokens_per_epoch = len(self.splits["train"][0]) * chunk_len

    def num_sequences(self, split: str) -> int:
        """Sequences of l consecutive chunks in a split (chunks after the last whole one unused)."""
        return (len(self.splits[split][0]) - 1) // self.l

    def batch(self, split: str, sequence_ids: np.ndarray) -> tuple[torch.Tensor, ...]:
        """tokens, targets, neighbours [b, l, 2, 2m], loss mask for sequences."""
        chunks, with_continuation = self.splits[split]
        ids = sequence_ids[:, None] * self.l + np.arange(self.l)  # (b, l)
        flat = chunks[np.concatenate([ids, ids[:, -1:] + 1], axis=1)].reshape(len(ids), -1)
        tokens, targets = flat[:, : self.l * self.m], flat[:, 1 : self.l * self.m + 1]
        distractors = self.rng.integers(0, len(chunks), size=ids.shape)
        neighbors = np.stack([with_continuation[ids], with_continuation[distractors]], axis=2)
        mask = (tokens != 0) & (targets != 0)
        return (
            torch.from_numpy(tokens),
            torch.from_numpy(targets),
            torch.from_numpy(neighbors),
            torch.from_numpy(mask.astype(np.int64)),
        )


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to min_lr (the platform's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def evaluate_mirror(model: Retro, data: OracleMirror, sequences: np.ndarray, batch_size: int) -> dict:
    """Mean valid loss (nats/token) with retrieval and with retrieval off."""
    model.eval()
    sums = {"on": 0.0, "off": 0.0}
    count = 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            tokens, targets, neighbors, mask = data.batch("valid", sequences[start : start + batch_size])
            weight = int(mask.sum())
            sums["off"] += float(model(tokens, None, targets, mask, return_logits=False)[1]) * weight
            if model.config.retrieval:
                sums["on"] += float(model(tokens, neighbors, targets, mask, return_logits=False)[1]) * weight
            count += weight
    model.train()
    return {k: v / count for k, v in sums.items()}


def run_mirror(args: argparse.Namespace) -> None:
    """Train RETRO variants and the baseline on the oracle-mirrored text; print the gap curve."""
    data = OracleMirror(args.max_documents, args.vocab_size, 64, args.seq_len, args.seed)
    valid = np.arange(min(data.num_sequences("valid"), args.eval_sequences))
    print(
        f"train tokens {data.tokens_per_epoch}, steps/epoch "
        f"{data.num_sequences('train') // args.batch_size}, valid sequences {len(valid)}",
        flush=True,
    )
    overrides = parse_overrides(args.set)
    base = dict(vocab_size=data.vocab_size, d_model=192, n_heads=4, n_layers=4, enc_layers=2, d_ff=768)
    variants = [("baseline", dict(retrieval=False))] if args.baseline else []
    variants += [(scheme, dict(cross_positions=scheme)) for scheme in args.cross_positions]
    for name, variant in variants:
        config = RetroConfig(**{**base, "max_seq_len": args.seq_len, **variant, **overrides})
        torch.manual_seed(args.seed)
        model = Retro(config)
        optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=args.lr, betas=(0.9, 0.95))
        order = np.random.default_rng(args.seed).permutation(data.num_sequences("train"))
        curve = []
        start = time.perf_counter()
        for step in range(args.steps):
            picks = order[(np.arange(args.batch_size) + step * args.batch_size) % len(order)]
            tokens, targets, neighbors, mask = data.batch("train", picks)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.lr / 10, args.warmup)
            _, loss = model(
                tokens, neighbors if config.retrieval else None, targets, mask, return_logits=False
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                scores = evaluate_mirror(model, data, valid, args.batch_size)
                point = {
                    "step": step + 1,
                    "train": round(float(loss.detach()), 4),
                    "seconds": round(time.perf_counter() - start),
                }
                point.update({k: round(v, 4) for k, v in scores.items()})
                curve.append(point)
                print(name, point, flush=True)
        emit(
            {
                "experiment": "mirror",
                "variant": name,
                "overrides": overrides,
                "seed": args.seed,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "curve": curve,
            },
            args.out,
        )


def main() -> None:
    """Parse arguments and run one experiment."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="experiment", required=True)
    copy = sub.add_parser("copy", help="synthetic copy tasks")
    copy.add_argument("--task", choices=sorted(TASKS), default="aligned")
    copy.add_argument("--steps", type=int, default=400)
    copy.add_argument("--lr", type=float, default=3e-3)
    copy.add_argument("--seeds", type=int, nargs="+", default=[0])
    mirror = sub.add_parser("mirror", help="real text with an oracle mirrored database")
    mirror.add_argument("--steps", type=int, default=600)
    mirror.add_argument("--batch-size", type=int, default=8)
    mirror.add_argument("--seq-len", type=int, default=256)
    mirror.add_argument("--lr", type=float, default=2e-3)
    mirror.add_argument("--warmup", type=int, default=30)
    mirror.add_argument("--eval-every", type=int, default=100)
    mirror.add_argument("--eval-sequences", type=int, default=64)
    mirror.add_argument("--max-documents", type=int, default=None)
    mirror.add_argument("--vocab-size", type=int, default=4096)
    mirror.add_argument("--seed", type=int, default=0)
    mirror.add_argument("--baseline", action="store_true", help="also train the decoder-only baseline")
    for p in (copy, mirror):
        p.add_argument("--cross-positions", nargs="+", choices=CROSS_POSITIONS, default=list(CROSS_POSITIONS))
        p.add_argument("--set", nargs="*", default=[], help="RetroConfig overrides, key=value")
        p.add_argument("--out", help="append JSON result lines to this file")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    (run_copy if args.experiment == "copy" else run_mirror)(args)


if __name__ == "__main__":
    main()
