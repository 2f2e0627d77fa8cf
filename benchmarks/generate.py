"""Generation speed: KV-cached decoding vs recomputing the whole sequence per token (same run).

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--preset small] [--threads 2]

Greedy decoding of ``--new-tokens`` tokens after a one-chunk prompt, with retrieval on: a neighbour
set arrives for every completed chunk (fixed random tokens, so the model's own cost is what is
measured; the pool's latency is measured by benchmarks/pool.py). The cached path keeps self-attention
keys/values and the encoded neighbours of each chunk; the uncached path runs the full forward for every
new token. Both must produce the same tokens, which the script checks. Prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from retro_model import RetroConfig
from retro_model.generate import generate
from retro_model.model import Retro


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


def main() -> None:
    """Run the comparison and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--preset", default="small", help="a retro_model preset (small ~9M parameters)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
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
