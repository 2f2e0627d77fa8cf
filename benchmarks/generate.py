"""Generation speed: KV-cached decoding vs recomputing the whole sequence per token (same run); with
``--batched``, concurrent sequences stepped together by the server's batched loop.

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--preset small] [--threads 2]
    .venv/bin/python benchmarks/generate.py --batched [--configs debug,demo] [--concurrency 1,4,16]
        [--new-tokens 256] [--threads 2]

Greedy decoding of ``--new-tokens`` tokens after a one-chunk prompt, with retrieval on: a neighbour
set arrives for every completed chunk (fixed random tokens, so the model's own cost is what is
measured; the pool's latency is measured by benchmarks/pool.py). The cached path keeps self-attention
keys/values and the encoded neighbours of each chunk; the uncached path runs the full forward for every
new token. Both must produce the same tokens, which the script checks. Prints tokens/s and the ratio.

``--batched``: for the model of each ``configs/<name>.yaml`` (its ``model:`` section and tokenizer
vocabulary; untrained weights), N sequences (prompts of 33-96 tokens, so they complete chunks at
different steps) are added to a ``retro_model.generate.BatchGenerator`` at once and stepped together
until each has ``--new-tokens`` new tokens: one ``decode_step`` per token for all of them and one
``retrieve_many`` call per step. Prints the new tokens per second of all sequences together (prefill
included), per N, beside ``generate`` of one sequence alone, in wall-clock time and in this process's
CPU time (steadier on a shared machine), and checks that the first sequence's tokens are the same in
every run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml
from machine import cpu_model  # benchmarks/machine.py, next to this script

from retro_model import RetroConfig
from retro_model.generate import BatchGenerator, generate
from retro_model.model import Retro

ROOT = Path(__file__).resolve().parent.parent


class FixedRetriever:
    """Neighbours for a chunk: deterministic random tokens derived from the chunk's content."""

    def __init__(self, cfg: RetroConfig):
        self.cfg = cfg
        self.calls = 0

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """[m] chunk tokens -> [k, r] neighbour tokens."""
        self.calls += 1
        gen = torch.Generator().manual_seed(int(chunk.sum()))
        shape = (self.cfg.num_neighbors, self.cfg.retrieved_len)
        return torch.randint(2, self.cfg.vocab_size, shape, generator=gen)


def timed(model: Retro, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    """(tokens, seconds) of one greedy generation."""
    retriever = FixedRetriever(model.config)
    t0 = time.perf_counter()
    out = generate(model, prompt, new_tokens, retrieve=retriever, use_cache=use_cache)
    return out, time.perf_counter() - t0


def machine_note() -> str:
    """CPU count and model, torch threads, load average."""
    model = cpu_model()
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average (1 min) {load:.2f}"
    )


def yaml_model_config(name: str) -> RetroConfig:
    """The model of ``configs/<name>.yaml``: its ``model:`` section with the tokenizer's vocabulary."""
    values = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    return RetroConfig.from_dict(
        {**values["model"], "vocab_size": values["database"]["tokenizer"]["vocab_size"]}
    )


def batched(
    model: Retro, prompts: list[torch.Tensor], new_tokens: int
) -> tuple[list[list[int]], float, float, int]:
    """Greedy generation of every prompt together -> (new tokens per prompt, seconds, CPU seconds of
    this process, steps)."""
    retriever = FixedRetriever(model.config)
    gen = BatchGenerator(model, retrieve_many=lambda handles, chunks: [retriever(c) for c in chunks])
    t0, cpu0 = time.perf_counter(), time.process_time()
    handles = [gen.add(prompt, new_tokens) for prompt in prompts]
    steps = 0
    with torch.inference_mode():
        while len(gen):
            gen.step()
            steps += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return [gen.new_tokens(handle) for handle in handles], seconds, cpu, steps


def main_batched(args: argparse.Namespace) -> None:
    """Tokens/s of 1 sequence vs N stepped together, for each config."""
    print(machine_note())
    concurrency = [int(x) for x in args.concurrency.split(",")]
    header = f"{'sequences':>9} {'steps':>6} {'seconds':>8} {'tokens/s':>9} {'ms/step':>8} {'vs 1':>6}"
    header += f" {'CPU s':>7} {'tokens/CPU s':>13} {'vs 1':>6}"
    for name in args.configs.split(","):
        cfg = yaml_model_config(name)
        torch.manual_seed(0)
        model = Retro(cfg).eval()
        m = cfg.chunk_len
        gen = torch.Generator().manual_seed(1)
        lengths = [m // 2 + 1 + (j * 23) % m for j in range(max(concurrency))]  # 33 .. 96 tokens at m=64
        prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=gen) for n in lengths]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"\n{name}: d_model {cfg.d_model}, {cfg.n_layers} layers (CCA {cfg.resolved_cca_layers}), "
            f"{cfg.enc_layers} encoder layers, chunk {m}, k={cfg.num_neighbors} r={cfg.retrieved_len}, "
            f"vocab {cfg.vocab_size} ({params:.1f}M parameters); {args.new_tokens} new tokens per sequence"
        )
        batched(model, prompts[:2], 8)  # warm-up
        new = args.new_tokens
        t0, cpu0 = time.perf_counter(), time.process_time()
        alone = generate(model, prompts[0], new, retrieve=FixedRetriever(cfg))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(header)
        print(
            f"{'generate':>9} {new:6d} {seconds:8.2f} {new / seconds:9.1f} {1000 * seconds / new:8.2f} "
            f"{'':6} {cpu:7.2f} {new / cpu:13.1f}"
        )
        single = None
        for n in concurrency:
            tokens, seconds, cpu, steps = batched(model, prompts[:n], new)
            if tokens[0] != alone[len(prompts[0]) :].tolist():
                raise SystemExit(
                    f"{name}: the first sequence's tokens differ from generate's with {n} sequences"
                )
            rate, cpu_rate = n * new / seconds, n * new / cpu
            single = single or (rate, cpu_rate)
            print(
                f"{n:9d} {steps:6d} {seconds:8.2f} {rate:9.1f} {1000 * seconds / steps:8.2f} "
                f"{rate / single[0]:5.1f}x {cpu:7.2f} {cpu_rate:13.1f} {cpu_rate / single[1]:5.1f}x"
            )
    print(f"\nafter: load average (1 min) {os.getloadavg()[0]:.2f}")


def main() -> None:
    """Run the comparison and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=None, help="512; 256 with --batched")
    parser.add_argument("--preset", default="small", help="a retro_model preset (small ~9M parameters)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batched", action="store_true", help="sequences stepped together (BatchGenerator)")
    parser.add_argument("--configs", default="debug,demo", help="--batched: configs/<name>.yaml models")
    parser.add_argument("--concurrency", default="1,4,16", help="--batched: sequences stepped together")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.batched:
        args.new_tokens = args.new_tokens or 256
        main_batched(args)
        return
    args.new_tokens = args.new_tokens or 512
    torch.manual_seed(0)
    cfg = RetroConfig.from_name(args.preset, vocab_size=args.vocab)
    model = Retro(cfg).eval()
    prompt = torch.randint(2, cfg.vocab_size, (cfg.chunk_len,))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"preset {args.preset} ({params:.1f}M parameters), prompt {cfg.chunk_len} tokens, "
        f"{args.new_tokens} new tokens, {args.threads} threads, retrieval on (k={cfg.num_neighbors})"
    )
    timed(model, prompt, 8, True)  # warm-up
    cached, cached_s = timed(model, prompt, args.new_tokens, True)
    uncached, uncached_s = timed(model, prompt, args.new_tokens, False)
    same = torch.equal(cached, uncached)
    print(f"{'path':<10} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'cached':<10} {cached_s:8.2f} {args.new_tokens / cached_s:9.1f}")
    print(f"{'uncached':<10} {uncached_s:8.2f} {args.new_tokens / uncached_s:9.1f}")
    print(f"speed-up: {uncached_s / cached_s:.1f}x; identical greedy tokens: {same}")
    if not same:
        raise SystemExit("cached and uncached decoding disagree")


if __name__ == "__main__":
    main()
