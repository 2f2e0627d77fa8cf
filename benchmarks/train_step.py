"""Training throughput of Retro vs the decoder-only baseline (same run, same machine).

Prints tokens/s (forward + backward + AdamW step) and peak RSS per configuration, the machine's fp32
matmul throughput, and model FLOP utilisation (MFU = model FLOPs/s / measured matmul FLOPs/s).
Each configuration runs in a fresh subprocess so its peak RSS is its own.

    .venv/bin/python benchmarks/train_step.py [--steps 12] [--threads 2]

Config (the issue's): vocab 8192, width 256, FFN 1024, 4 heads, 6 decoder layers with CCA at 3 and 6,
2 encoder layers, chunk 64, seq 512, k 2, r 128, batch 4.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIG = dict(
    vocab_size=8192,
    d_model=256,
    n_heads=4,
    n_layers=6,
    d_ff=1024,
    cca_layers=(3, 6),
    enc_layers=2,
    chunk_len=64,
    num_neighbors=2,
    neighbor_len=128,
    max_seq_len=512,
)
BATCH, SEQ = 4, 512


def model_flops_per_token(cfg, retrieval: bool) -> float:
    """Training FLOPs per decoder token: 6 x (matmul params touched per token) + attention terms."""
    d, ff, L, V, n = cfg.d_model, cfg.ff_width, cfg.n_layers, cfg.vocab_size, SEQ
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


def run_one(name: str, retrieval: bool, amp: bool, steps: int, threads: int) -> dict:
    """Measure one configuration in this process."""
    import torch

    from retro_model import RetroConfig
    from retro_model.model import Retro

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = RetroConfig(**CONFIG, retrieval=retrieval)
    model = Retro(cfg)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    tokens = torch.randint(1, cfg.vocab_size, (BATCH, SEQ))
    targets = tokens.roll(-1, 1)
    neighbors = torch.randint(
        1, cfg.vocab_size, (BATCH, SEQ // cfg.chunk_len, cfg.num_neighbors, cfg.retrieved_len)
    )
    times = []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            _, loss = model(tokens, neighbors if retrieval else None, targets=targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens_per_s = BATCH * SEQ / step_time
    return {
        "name": name,
        "params_M": model.num_parameters() / 1e6,
        "tokens_per_s": tokens_per_s,
        "model_gflops": tokens_per_s * model_flops_per_token(cfg, retrieval) / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def matmul_gflops(threads: int, dtype: str = "float32") -> float:
    """Measured dense matmul throughput at training-like shapes."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a = torch.randn(2048, 256, dtype=dt)
    b = torch.randn(256, 1024, dtype=dt)
    for _ in range(5):
        a @ b
    t0 = time.perf_counter()
    reps = 40
    for _ in range(reps):
        a @ b
    return 2 * 2048 * 256 * 1024 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, retrieval, amp = args.child.split(",")
        print(json.dumps(run_one(name, retrieval == "1", amp == "1", args.steps, args.threads)))
        return
    rows = []
    for name, retrieval, amp in [
        ("retro fp32", "1", "0"),
        ("baseline fp32 (retrieval=False)", "0", "0"),
        ("retro bf16 autocast", "1", "1"),
        ("baseline bf16 autocast", "0", "1"),
    ]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--child",
                f"{name},{retrieval},{amp}",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = {"float32": matmul_gflops(args.threads), "bfloat16": matmul_gflops(args.threads, "bfloat16")}
    base_fp32 = rows[1]["tokens_per_s"]
    print(
        f"machine matmul (2048x256 @ 256x1024, {args.threads} threads): fp32 {peak['float32']:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16']:.0f} GFLOP/s"
    )
    print(
        f"{'config':34s} {'params':>7s} {'tokens/s':>9s} {'vs base fp32':>12s} {'GFLOP/s':>8s} {'MFU':>6s} {'peak RSS':>9s}"
    )
    for row in rows:
        ref = peak["bfloat16"] if "bf16" in row["name"] else peak["float32"]
        print(
            f"{row['name']:34s} {row['params_M']:6.1f}M {row['tokens_per_s']:9.0f} "
            f"{row['tokens_per_s'] / base_fp32:11.2f}x {row['model_gflops']:8.1f} "
            f"{row['model_gflops'] / ref:6.0%} {row['peak_rss_gb']:8.2f}G"
        )


if __name__ == "__main__":
    main()
