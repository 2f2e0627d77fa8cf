"""Training throughput and peak memory of Retro vs the decoder-only baseline and peer RETRO implementations.

Prints tokens/s (forward + backward + AdamW step) and peak RSS per configuration, the machine's fp32
and bf16 matmul throughput, and model FLOP utilisation (MFU = model FLOPs/s / measured matmul FLOPs/s)
for our rows. Each configuration runs in a fresh subprocess so its peak RSS is its own; with
``--repeats N`` every configuration runs N times, interleaved, and the table shows the median.

    .venv/bin/python benchmarks/train_step.py [--steps 12] [--threads 2] [--repeats 3] \
        [--peers-python /work/peers-venv/bin/python]

``--peers-python`` also times labml-nn 0.5.1, megatron-core 0.15.3 and retro-pytorch 0.3.9 at the same
shape with the same timing loop (``benchmarks/peers/``), each in a subprocess of that interpreter
(create it with ``make peers-venv``), and adds ratios vs the best peer: tokens/s vs the fastest peer,
peak RSS vs the peer with the smallest peak RSS.

Shape (the issue's): vocab 8192, width 256, FFN 1024, 4 heads, 6 decoder layers with CCA at 3 and 6,
2 encoder layers, chunk 64, seq 512, k 2, r 128, batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peers import ADAPTERS
from peers.common import SHAPE, rss_gb, time_training

BENCH_DIR = Path(__file__).resolve().parent

# (label, retrieval, bf16 autocast) for our model
OURS = [
    ("retro fp32", True, False),
    ("baseline fp32 (retrieval=False)", False, False),
    ("retro bf16 autocast", True, True),
    ("baseline bf16 autocast", False, True),
]


def retro_config(retrieval: bool, **overrides):
    """Our RetroConfig at the benchmark shape."""
    from retro_model import RetroConfig

    s = SHAPE
    return RetroConfig(
        vocab_size=s["vocab_size"],
        d_model=s["d_model"],
        n_heads=s["n_heads"],
        n_layers=s["n_layers"],
        d_ff=s["d_ff"],
        cca_layers=tuple(s["cca_layers"]),
        enc_layers=s["enc_layers"],
        chunk_len=s["chunk_len"],
        num_neighbors=s["num_neighbors"],
        neighbor_len=s["neighbor_len"],
        max_seq_len=s["seq_len"],
        retrieval=retrieval,
        **overrides,
    )


def model_flops_per_token(cfg, retrieval: bool) -> float:
    """Training FLOPs per decoder token: 6 x (matmul params touched per token) + attention terms."""
    d, ff, L, V, n = cfg.d_model, cfg.ff_width, cfg.n_layers, cfg.vocab_size, SHAPE["seq_len"]
    per_layer = 4 * d * d + 2 * d * ff  # qkv + proj + MLP
    flops = 6 * (L * per_layer + d * V) + 6 * L * n * d  # + causal attention (QK^T and AV, half masked)
    if retrieval:
        e, eff, k, r, m = cfg.enc_width, cfg.enc_ff_width, cfg.num_neighbors, cfg.retrieved_len, cfg.chunk_len
        enc_tokens_per_token = k * r / m  # the encoder reads k*r tokens per m decoder tokens
        enc_layer = 4 * e * e + 2 * e * eff + 2 * e * e  # self-attn + MLP + cross q/proj
        enc_layer += 2 * e * d  # cross kv from the chunk (per chunk token, amortised)
        flops += 6 * enc_tokens_per_token * (cfg.enc_layers * enc_layer + 2 * e * r + 2 * e * m)
        cca = len(cfg.resolved_cca_layers)
        flops += 6 * cca * (2 * d * d + 2 * d * e * (k * r) / m + 2 * d * k * r)  # CCA q/proj, kv, attention
    return flops


def run_ours(name: str, retrieval: bool, amp: bool, steps: int, threads: int) -> dict:
    """Measure one configuration of our model in this process."""
    import torch

    from retro_model.model import Retro

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = retro_config(retrieval)
    model = Retro(cfg)
    build_rss = rss_gb()

    def loss_fn(tokens, targets, neighbors):
        return model(tokens, neighbors if retrieval else None, targets=targets, return_logits=False)[1]

    result = time_training(model, loss_fn, SHAPE, steps, params=model.param_groups(0.1), amp=amp)
    result.update(
        name=name,
        rss_after_build_gb=build_rss,
        peak_rss_gb=rss_gb(),
        model_gflops=result["tokens_per_s"] * model_flops_per_token(cfg, retrieval) / 1e9,
    )
    return result


def matmul_gflops(threads: int, dtype: str = "float32") -> float:
    """Measured dense matmul throughput at training-like shapes."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a = torch.randn(2048, 256, dtype=dt)
    b = torch.randn(256, 1024, dtype=dt)
    for _ in range(5):
        a @ b
    reps, best = 20, float("inf")
    for _ in range(5):  # the best of 5 trials: the machine's rate, not its momentary load
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * 256 * 1024 * reps / best / 1e9


def last_json(stdout: str) -> dict | None:
    """The last line of a child's stdout parsed as JSON, or None."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def run_child(cmd: list[str], name: str, cwd: Path) -> dict:
    """Run one measurement subprocess; a crash becomes an error row naming its last stderr line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    result = last_json(proc.stdout)
    if result is None:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        result = {"name": name, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return result


def load() -> str:
    """The 1/5/15-minute load averages and the CPU count, for the record."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def summarise(runs: list[dict]) -> dict:
    """Median over repeats of one configuration (errors win: a configuration that failed once is shown failed)."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    out = dict(runs[-1])
    tps = [r["tokens_per_s"] for r in runs]
    out["tokens_per_s"] = statistics.median(tps)
    out["tokens_per_s_range"] = (min(tps), max(tps))
    out["peak_rss_gb"] = statistics.median(r["peak_rss_gb"] for r in runs)
    if "model_gflops" in out:
        out["model_gflops"] = statistics.median(r["model_gflops"] for r in runs)
    return out


def main() -> None:
    """Run every configuration in subprocesses and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median shown)")
    parser.add_argument(
        "--peers-python", help="interpreter of the peers venv (make peers-venv) to time the peers as well"
    )
    parser.add_argument("--only-ours", action="store_true", help="skip the baseline and bf16 rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, retrieval, amp = args.child.split(",")
        print(json.dumps(run_ours(name, retrieval == "1", amp == "1", args.steps, args.threads)))
        return

    common = ["--steps", str(args.steps), "--threads", str(args.threads)]
    jobs: list[tuple[str, list[str], Path]] = []
    for name, retrieval, amp in OURS[:1] if args.only_ours else OURS:
        child = f"{name},{int(retrieval)},{int(amp)}"
        jobs.append((name, [sys.executable, __file__, *common, "--child", child], BENCH_DIR))
    if args.peers_python:
        peers_python = os.path.abspath(args.peers_python)  # children run in benchmarks/; no symlink resolving
        for module, name in ADAPTERS.items():
            cmd = [peers_python, "-W", "ignore", "-m", f"peers.{module}", "--shape", json.dumps(SHAPE)]
            jobs.append((name, cmd + common, BENCH_DIR))

    print(f"before: {load()}")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
    for repeat in range(args.repeats):  # interleaved, so load changes hit every configuration alike
        for name, cmd, cwd in jobs:
            runs[name].append(run_child(cmd, name, cwd))
        print(f"after round {repeat + 1}/{args.repeats}: {load()}", flush=True)
    rows = [summarise(runs[name]) for name, _, _ in jobs]

    peak = {"float32": matmul_gflops(args.threads), "bfloat16": matmul_gflops(args.threads, "bfloat16")}
    print(
        f"machine matmul (2048x256 @ 256x1024, {args.threads} threads): fp32 {peak['float32']:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16']:.0f} GFLOP/s; {args.steps} timed steps, median of {args.repeats} run(s)"
    )
    base = [r for r in rows if r["name"] == OURS[1][0] and "error" not in r]
    base_tps = base[0]["tokens_per_s"] if base else None
    peers_ok = [r for r in rows if r["name"] in ADAPTERS.values() and "error" not in r]
    best_tps = max((r["tokens_per_s"] for r in peers_ok), default=None)
    best_rss = min((r["peak_rss_gb"] for r in peers_ok), default=None)
    if peers_ok:
        fastest = max(peers_ok, key=lambda r: r["tokens_per_s"])["name"]
        leanest = min(peers_ok, key=lambda r: r["peak_rss_gb"])["name"]
        print(
            f"best peer: fastest {fastest} ({best_tps:.0f} tokens/s), least memory {leanest} ({best_rss:.2f} GB)"
        )
    print()
    print(
        "| config | params | tokens/s (min-max) | vs baseline fp32 | vs best peer | MFU | peak RSS | vs best peer "
        "| notes |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | - | - | - | - | - | - | - | could not run: {row['error']} |")
            continue
        lo, hi = row.get("tokens_per_s_range", (row["tokens_per_s"],) * 2)
        tps = (
            f"{row['tokens_per_s']:.0f} ({lo:.0f}-{hi:.0f})"
            if args.repeats > 1
            else f"{row['tokens_per_s']:.0f}"
        )
        mfu = "-"
        if "model_gflops" in row:
            ref = peak["bfloat16"] if "bf16" in row["name"] else peak["float32"]
            mfu = f"{row['model_gflops'] / ref:.0%}"
        vs_tps = f"{row['tokens_per_s'] / best_tps:.2f}x" if best_tps else "-"
        vs_base = f"{row['tokens_per_s'] / base_tps:.2f}x" if base_tps else "-"
        vs_rss = f"{row['peak_rss_gb'] / best_rss:.2f}x" if best_rss else "-"
        print(
            f"| {row['name']} | {row['params_M']:.1f}M | {tps} | {vs_base} | {vs_tps} | {mfu} | "
            f"{row['peak_rss_gb']:.2f} GB | {vs_rss} | {row.get('notes', '')} |"
        )
    print(f"\nafter: {load()}")


if __name__ == "__main__":
    main()
