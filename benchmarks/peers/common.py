"""The timing harness shared by benchmarks/train_step.py and every peer adapter.

Imports only torch and the standard library, so it runs both in the project's venv (our model) and in
the separate peers venv (``make peers-venv``). Every configuration, ours or a peer's, is timed by the
same loop on the same random batch: forward (loss) + ``zero_grad`` + backward + AdamW step, warm-up
steps excluded, median step time of the rest; peak RSS is the process's ``ru_maxrss``, so each
configuration must run in a fresh process.

A peer adapter is a module ``peers.<name>`` with ``build(shape) -> (model, loss_fn, notes)`` where
``loss_fn(tokens[b, n], targets[b, n], neighbors[b, l, k, r]) -> scalar loss``; its ``__main__`` calls
``run_adapter(NAME, build)``. Run one from the benchmarks/ folder:

    cd benchmarks && /work/peers-venv/bin/python -m peers.labml_nn --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

# The benchmark shape: vocab 8192, width 256, FFN 1024, 4 heads, 6 decoder layers with CCA at
# 3 and 6 (1-based), 2 encoder layers, chunk 64, seq 512, k 2, r 128, batch 4.
SHAPE: dict[str, Any] = dict(
    vocab_size=8192,
    d_model=256,
    n_heads=4,
    n_layers=6,
    d_ff=1024,
    cca_layers=[3, 6],
    enc_layers=2,
    chunk_len=64,
    num_neighbors=2,
    neighbor_len=128,
    seq_len=512,
    batch=4,
)
WARMUP_STEPS = 3

LossFn = Callable[[Any, Any, Any], Any]


def rss_gb() -> float:
    """Peak resident set size of this process so far, in GiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_batch(shape: dict[str, Any]):
    """The benchmark batch: tokens [b, n] and targets [b, n] in 1..V-1 (no padding), neighbours [b, l, k, r]."""
    import torch

    torch.manual_seed(0)
    b, n, v = shape["batch"], shape["seq_len"], shape["vocab_size"]
    tokens = torch.randint(1, v, (b, n))
    targets = tokens.roll(-1, 1)
    l = n // shape["chunk_len"]  # noqa: E741 - the paper's name for the number of chunks
    neighbors = torch.randint(1, v, (b, l, shape["num_neighbors"], shape["neighbor_len"]))
    return tokens, targets, neighbors


def time_training(
    model,
    loss_fn: LossFn,
    shape: dict[str, Any],
    steps: int,
    params=None,
    amp: bool = False,
) -> dict[str, Any]:
    """Time ``steps`` training steps (after warm-up) of ``model``; returns tokens/s and step times.

    ``params`` are what AdamW optimises (default ``model.parameters()``); ``amp`` runs the forward under
    CPU bf16 autocast.
    """
    import torch

    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=1e-3, weight_decay=0.1)
    tokens, targets, neighbors = make_batch(shape)
    times = []
    loss = None
    for step in range(steps + WARMUP_STEPS):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(tokens, targets, neighbors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    return {
        "tokens_per_s": shape["batch"] * shape["seq_len"] / step_time,
        "step_s": [round(t, 4) for t in times],
        "final_loss": float(loss.detach()),
        "params_M": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6,
    }


def adapter_args() -> argparse.Namespace:
    """Command line of a peer adapter: --shape JSON, --steps, --threads."""
    parser = argparse.ArgumentParser(description="time one peer RETRO implementation")
    parser.add_argument("--shape", default=json.dumps(SHAPE), help="benchmark shape as JSON")
    parser.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def run_adapter(name: str, build: Callable[[dict[str, Any]], tuple[Any, LossFn, str]]) -> None:
    """Build a peer model with ``build(shape)``, time it, and print one JSON line.

    A peer that cannot be built or cannot train prints ``{"name", "error"}`` instead of numbers, so the
    benchmark table can say why.
    """
    args = adapter_args()
    shape = json.loads(args.shape)
    result: dict[str, Any] = {"name": name}
    try:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        model, loss_fn, notes = build(shape)
        result["rss_after_build_gb"] = rss_gb()  # interpreter + libraries + model weights
        model.train()
        result["notes"] = notes
        result.update(time_training(model, loss_fn, shape, args.steps))
        result["peak_rss_gb"] = rss_gb()
    except Exception as exc:  # reported in the table instead of numbers
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        result["traceback"] = traceback.format_exc()[-2000:]
    print(json.dumps(result))
