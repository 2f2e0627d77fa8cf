"""megatron-core 0.15.3's RetroModel (the last release with RETRO) at the benchmark shape, on CPU.

Megatron-core targets CUDA; the adapter changes nothing in its model code and works around, in this
process only:
- ``RetroConfig.__post_init__`` calls ``is_te_min_version`` which fails without Transformer Engine
  installed (``None >= Version``): it is made to answer False (no TE here, so the check is moot).
- CUDA-only buffers: the rotary table moves its ``inv_freq`` to ``torch.cuda.current_device()`` and
  the default causal mask is built with ``device="cuda"``; ``current_device`` answers the CPU and the
  causal mask is built on the CPU (same values).
- The CUDA RNG tracker that attention dropout forks is replaced by a no-op (dropout is 0).
- A one-process gloo group stands in for the NCCL model-parallel groups (tensor/pipeline size 1).

Matched: vocab, width, FFN, heads, decoder layers, chunk length, k, r (two retrieved chunks of 64),
encoder layers, tied embeddings (its training script's default). ``get_retro_decoder_block_spec`` puts
CCA at layers 6, 9, ... whatever the config says; the adapter builds the same spec with CCA at the
benchmark's layers instead. Its encoder keeps its own design (cross-attention to the chunk in the
first encoder layer only), its LayerNorm and biases; it ignores neighbour masks (none are padded here).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from peers.common import run_adapter

NAME = "megatron-core 0.15.3"


def _cpu_workarounds() -> None:
    """Patch the CUDA-only paths megatron-core's RETRO takes (see the module docstring)."""
    import contextlib
    import functools

    import torch

    os.environ.setdefault("NVTE_FLASH_ATTN", "0")
    os.environ.setdefault("NVTE_FUSED_ATTN", "0")
    torch.cuda.current_device = lambda: torch.device("cpu")

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.models.retro.config as retro_config
    from megatron.core import tensor_parallel

    retro_config.is_te_min_version = lambda *args, **kwargs: False
    fused_softmax.get_default_causal_mask = functools.lru_cache(maxsize=32)(
        lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)
    )
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()


def _decoder_spec(config, cca_layers: list[int]):
    """``get_retro_decoder_block_spec`` (local modules) with CCA at ``cca_layers`` instead of 6, 9, ..."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.retro.decoder_spec import get_retro_decoder_layer_local_spec
    from megatron.core.models.retro.encoder_spec import get_retro_encoder_block_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    first = min(cca_layers)
    specs = []
    for number in range(1, config.num_layers + 1):
        if number == first:  # the first retro layer owns the neighbour encoder
            specs.append(get_retro_decoder_layer_local_spec(get_retro_encoder_block_spec(config, False)))
        elif number in cca_layers:
            specs.append(get_retro_decoder_layer_local_spec())
        else:
            specs.append(get_gpt_layer_local_spec())
    return TransformerBlockSubmodules(layer_specs=specs)


def build(shape: dict[str, Any]):
    """Megatron-core's RetroModel and its loss function at ``shape``."""
    import torch
    import torch.distributed as dist

    _cpu_workarounds()
    from megatron.core import parallel_state
    from megatron.core.models.retro import RetroConfig, RetroModel

    store = os.path.join(tempfile.mkdtemp(prefix="megatron-peer-"), "store")  # a file rendezvous, no port
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)

    m, r = shape["chunk_len"], shape["neighbor_len"]
    if r % m:
        raise ValueError(f"megatron retrieves whole chunks: neighbor_len {r} not a multiple of {m}")
    config = RetroConfig(
        num_layers=shape["n_layers"],
        hidden_size=shape["d_model"],
        num_attention_heads=shape["n_heads"],
        ffn_hidden_size=shape["d_ff"],
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        retro_encoder_hidden_dropout=0.0,
        retro_encoder_attention_dropout=0.0,
        retro_chunk_length=m,
        retro_num_neighbors=shape["num_neighbors"],
        retro_num_retrieved_chunks=r // m,
        retro_encoder_num_layers=shape["enc_layers"],
        retro_split_preprocessing="98,2,0",  # required by the config, unused without its data pipeline
    )
    model = RetroModel(
        config=config,
        transformer_layer_spec=_decoder_spec(config, list(shape["cca_layers"])),
        vocab_size=shape["vocab_size"],
        max_sequence_length=shape["seq_len"],
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    n, k = shape["seq_len"], shape["num_neighbors"]
    position_ids = torch.arange(n)[None].expand(shape["batch"], n)
    context_position_ids = torch.arange(r)[None].expand(shape["batch"] * (n // m) * k, r)

    def loss_fn(tokens, targets, neighbors):
        per_token = model(
            tokens,
            position_ids,
            None,  # causal decoder mask built inside (attn_mask_type causal)
            context_input_ids=neighbors.reshape(-1, r),  # (b*l*k, r), as its get_batch does
            context_position_ids=context_position_ids,
            context_mask=None,
            labels=targets,
        )  # (b, n) losses
        return per_token.mean()

    return model, loss_fn, "CPU workarounds; CCA layers set explicitly"


if __name__ == "__main__":
    run_adapter(NAME, build)
