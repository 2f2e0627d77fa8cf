"""retro-pytorch 0.3.9 (lucidrains' ``RETRO``) at the benchmark shape.

Matched: vocab, width (encoder and decoder), FFN (ff_mult 4), decoder layers, CCA at the same decoder
layers, encoder layers (cross-attention to the chunk in every layer, its default), chunk length, k, r,
head size d/h. ``RETRO`` ignores its ``heads`` argument (its Encoder and Decoder keep their default of
8 heads, i.e. attention twice as wide as the model); the adapter passes ``heads`` through to them so the
attention width matches. Its loss is its own ``return_loss=True`` path, which shifts the sequence by
itself: it is given the n tokens plus the last target, so it trains on exactly n positions.
"""

from __future__ import annotations

import functools
from typing import Any

from peers.common import run_adapter

NAME = "retro-pytorch 0.3.9"


def build(shape: dict[str, Any]):
    """The retro-pytorch RETRO model and its loss function at ``shape``."""
    import torch
    from retro_pytorch import retro_pytorch as rp

    d, h = shape["d_model"], shape["n_heads"]
    # RETRO.__init__ does not pass `heads` on: make its Encoder / Decoder use the requested count.
    rp.Encoder = functools.partial(rp.Encoder, heads=h)
    rp.Decoder = functools.partial(rp.Decoder, heads=h)
    model = rp.RETRO(
        num_tokens=shape["vocab_size"],
        max_seq_len=shape["seq_len"],
        enc_dim=d,
        enc_depth=shape["enc_layers"],
        enc_cross_attn_layers=None,  # every encoder layer
        dec_depth=shape["n_layers"],
        dec_cross_attn_layers=tuple(shape["cca_layers"]),
        heads=h,
        dec_dim=d,
        dim_head=d // h,
        chunk_size=shape["chunk_len"],
        pad_id=0,
    )
    assert model.decoder.layers[0][0].fn.heads == h, "heads patch did not take"

    def loss_fn(tokens, targets, neighbors):
        seq = torch.cat((tokens, targets[:, -1:]), dim=1)  # (b, n + 1): RETRO shifts it itself
        return model(seq, neighbors, return_loss=True)

    return model, loss_fn, "heads passed through (RETRO ignores its heads argument)"


if __name__ == "__main__":
    run_adapter(NAME, build)
