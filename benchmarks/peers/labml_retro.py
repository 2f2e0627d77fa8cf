"""labml-nn 0.5.1's RETRO (``labml_nn.transformers.retro.model``) at the benchmark shape.

Matched: vocab, width, FFN, heads (head size d/h), decoder layers, CCA at the same decoder layers
(labml numbers layers from 0), encoder layers with cross-attention to the chunk in every encoder layer
(as ours), chunk length, k, r. labml's model returns logits; the loss is the cross-entropy of its
training script. Its own defects are left as they are (no neighbour padding mask, no final norm).
"""

from __future__ import annotations

from typing import Any

from peers.common import run_adapter

NAME = "labml-nn 0.5.1"


def build(shape: dict[str, Any]):
    """The labml RetroModel and its loss function at ``shape``."""
    import torch.nn.functional as F
    from labml_nn.transformers.retro.model import NearestNeighborEncoder, RetroModel

    d, h = shape["d_model"], shape["n_heads"]
    encoder = NearestNeighborEncoder(
        chunk_len=shape["chunk_len"],
        n_layers=shape["enc_layers"],
        ca_layers=set(range(shape["enc_layers"])),
        d_model=d,
        n_heads=h,
        d_k=d // h,
        d_ff=shape["d_ff"],
    )
    model = RetroModel(
        n_vocab=shape["vocab_size"],
        d_model=d,
        n_layers=shape["n_layers"],
        ca_layers={i - 1 for i in shape["cca_layers"]},
        chunk_len=shape["chunk_len"],
        n_heads=h,
        d_k=d // h,
        d_ff=shape["d_ff"],
        encoder=encoder,
    )

    def loss_fn(tokens, targets, neighbors):
        logits = model(tokens, neighbors)  # (b, n, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return model, loss_fn, "as published"


if __name__ == "__main__":
    run_adapter(NAME, build)
