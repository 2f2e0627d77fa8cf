"""Forward + backward time of the model's parts at the training-step benchmark's shapes, each next to
the plain PyTorch it replaces, interleaved in one process (min and median of ``--repeats`` calls).

    .venv/bin/python benchmarks/model_parts.py [--repeats 30] [--threads 2]

- causal self-attention of the decoder (b 4, 4 heads, 512 tokens, head size 64):
  ``retro_model.ops.causal_attention`` (blocked batched matmuls) vs ``scaled_dot_product_attention``;
- the neighbour encoder's feed-forward (8192 rows, width 256, hidden 1024): in 16 MB row pieces (what
  ``FeedForward`` does on CPU) vs in one piece, and exact vs tanh GELU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retro_model import model as model_module
from retro_model.ops import causal_attention


def interleaved(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (min ms, median ms) of each variant, the variants called in turn ``repeats`` times."""
    for run in variants.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t) * 1e3, statistics.median(t) * 1e3) for name, t in times.items()}


def attention_variants() -> dict[str, Callable[[], None]]:
    """Decoder causal self-attention, forward + backward, ours vs SDPA (q, k, v as the model passes them)."""
    qkv = torch.randn(3, 4, 4, 512, 64)
    q, k, v = (x.clone().requires_grad_() for x in qkv)
    grad = torch.randn(4, 4, 512, 64)
    return {
        "causal attention: SDPA (CPU flash)": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True
        ).backward(grad),
        "causal attention: blocked bmm (ours)": lambda: causal_attention(q, k, v).backward(grad),
    }


def feed_forward_variants() -> dict[str, Callable[[], None]]:
    """The encoder's feed-forward (with its pre-norm), forward + backward, pieces vs one piece, GELU forms."""
    norm = model_module.RMSNorm(256, 1e-6)
    x = torch.randn(8192, 256, requires_grad=True)
    grad = torch.randn(8192, 256)
    exact = model_module.FeedForward(256, 1024, 0.0, "gelu")
    tanh = model_module.FeedForward(256, 1024, 0.0, "gelu_tanh")
    tanh.load_state_dict(exact.state_dict())
    pieces = model_module.CPU_FFN_PIECE_ELEMENTS

    def run(ff: model_module.FeedForward, piece_elements: int) -> Callable[[], None]:
        def call() -> None:
            model_module.CPU_FFN_PIECE_ELEMENTS = piece_elements
            try:
                ff(x, norm=norm).backward(grad)
            finally:
                model_module.CPU_FFN_PIECE_ELEMENTS = pieces

        return call

    return {
        "encoder FFN: exact GELU, one piece": run(exact, 1 << 40),
        "encoder FFN: exact GELU, 16 MB pieces (ours)": run(exact, pieces),
        "encoder FFN: tanh GELU, one piece": run(tanh, 1 << 40),
    }


def main() -> None:
    """Time every part and print a table with the ratio to the first variant of its group."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| part | min ms | median ms | median vs first row of its part |\n| --- | --- | --- | --- |")
    for variants in (attention_variants(), feed_forward_variants()):
        results = interleaved(variants, args.repeats)
        reference = next(iter(results.values()))[1]
        for name, (fastest, median) in results.items():
            print(f"| {name} | {fastest:.1f} | {median:.1f} | {reference / median:.2f}x |")


if __name__ == "__main__":
    main()
