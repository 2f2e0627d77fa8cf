"""Training-step time of the demo's RETRO with a full-width and a half-width neighbour encoder, and of
the decoder-only baseline (same decoder), measured interleaved in one process.

Shape: the demo model (d 192, 4 heads, 4 layers, CCA at layer 2, 2 encoder layers, d_ff 768, vocab
4096), batch 4 x 256 tokens, k 2 neighbours of 128 tokens, AdamW, fp32, 2 threads. Prints the median
milliseconds per step (forward + backward + optimizer step) of 20 steps each after a warm-up round.

    python benchmarks/encoder_width.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro_model.config import RetroConfig  # noqa: E402
from retro_model.model import Retro  # noqa: E402

VARIANTS = {
    "full encoder (d'=192)": {},
    "half encoder (d'=96, 2 heads)": dict(enc_d_model=96, enc_n_heads=2),
    "baseline (no retrieval)": dict(retrieval=False),
}


def main() -> None:
    """Time every variant in interleaved rounds and print the medians."""
    torch.set_num_threads(2)
    models = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        config = RetroConfig(
            vocab_size=4096,
            d_model=192,
            n_heads=4,
            n_layers=4,
            enc_layers=2,
            d_ff=768,
            max_seq_len=256,
            **overrides,
        )
        model = Retro(config)
        models[name] = (config, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    b, n, k = 4, 256, 2
    tokens = torch.randint(1, 4096, (b, n))
    neighbors = torch.randint(1, 4096, (b, n // 64, k, 128))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(5):  # round 0 warms up
        for name, (config, model, optimizer) in models.items():
            for _ in range(5):
                start = time.perf_counter()
                _, loss = model(
                    tokens, neighbors if config.retrieval else None, targets=tokens, return_logits=False
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if round_:
                    times[name].append(time.perf_counter() - start)
    full = statistics.median(times["full encoder (d'=192)"])
    for name, measured in times.items():
        step = statistics.median(measured)
        print(
            f"{name}: {step * 1000:.0f} ms/step, {b * n / step:.0f} tokens/s, {step / full:.2f}x the full encoder's step"
        )


if __name__ == "__main__":
    main()
