"""Retro: a decoder-only transformer that reads retrieved neighbours through chunked cross-attention.

Shape legend (see ``retro_model.config``):
    b batch, n tokens, l chunks, m chunk length, k neighbours per chunk, r tokens per neighbour,
    d decoder width, e encoder width (d'), h heads, s head size, V vocabulary.

Data flow of ``forward(tokens[b, n], neighbors[b, l, k, r])``:
    1. token embedding -> decoder layers (pre-norm RMSNorm, rotary causal self-attention, GELU MLP).
    2. at the first CCA layer, the decoder's hidden states of each complete chunk u condition the
       neighbour encoder: the k neighbours of chunk u (embedded with the shared token embedding) run
       bidirectional self-attention and cross-attend to chunk u's hidden states. Output [b, l, k*r, e].
    3. every CCA layer: tokens from the last token of chunk u to the token before the last of chunk
       u+1 (the chunk_len - 1 shift) attend to chunk u's encoded neighbours, plus a learned null
       key/value so that a chunk whose neighbours are all padding attends to nothing.
    4. final RMSNorm -> logits [b, n, V]; loss = cross-entropy over targets that are not padding
       (computed in row chunks without materialising the logits when they are not asked for).
No token ever sees neighbours retrieved with tokens after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retro_model.config import ACTIVATIONS, RetroConfig
from retro_model.loss import IGNORE_INDEX, linear_cross_entropy
from retro_model.ops import causal_attention, gelu_linear, kv_heads, rms_norm, rms_norm_linear, rotary_qkv


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> same shape."""
        return rms_norm(x, self.weight, self.eps)

    def linear(self, x: Tensor, linear: nn.Linear) -> Tensor:
        """``linear(self(x))`` that recomputes ``self(x)`` in the backward pass instead of keeping it."""
        return rms_norm_linear(x, self.weight, self.eps, linear.weight)


def project(x: Tensor, linear: nn.Linear, norm: RMSNorm | None) -> Tensor:
    """``linear(norm(x))``, or ``linear(x)`` without a norm."""
    return linear(x) if norm is None else norm.linear(x, linear)


def rotary_tables(max_len: int, head_size: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_len, head_size/2] for rotary position embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, s/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of x [b, h, n, s] by angles cos/sin [n, s/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused QKV and rotary positions (causal or bidirectional)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        causal: bool,
        key_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        norm: RMSNorm | None = None,
    ) -> Tensor:
        """x [B, t, dim] -> [B, t, dim] (``norm``: apply it to x first, as a pre-norm layer does).

        key_mask [B, t] (True = attend) masks padding keys (bidirectional use). With ``cache`` the t new
        tokens follow the cached ones: their keys/values are appended and they attend to all of them.
        """
        bsz, t, dim = x.shape
        qkv = project(x, self.qkv, norm).view(bsz, t, 3, self.heads, dim // self.heads)
        q, k, v = rotary_qkv(qkv, cos, sin)  # each (B, h, t, s)
        mask = None
        if cache is not None:
            if cache.k is not None:
                k = torch.cat((cache.k, k), dim=2)
                v = torch.cat((cache.v, v), dim=2)
            cache.k, cache.v = k, v
            past = k.shape[2] - t
            if causal and t > 1:
                # new token i (absolute past + i) sees keys 0 .. past + i
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        elif key_mask is not None:
            mask = key_mask[:, None, None, :]  # (B, 1, 1, t)
        dropout = self.dropout if self.training else 0.0
        if causal and mask is None:
            out = causal_attention(q, k, v, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(bsz, t, dim))


@dataclass
class CrossPositions:
    """Token positions of a cross-attention's queries [t] and keys [c] (int64), for its position scheme.

    ``offset`` makes ``key - query + offset`` an index into a table of relative distances
    (``config.cross_positions == "relative"``).
    """

    query: Tensor
    key: Tensor
    offset: int

    def distance_index(self, num_distances: int) -> Tensor:
        """[t, c] index of each (query, key) pair's relative distance in a table of ``num_distances``."""
        return (self.key[None, :] - self.query[:, None] + self.offset).clamp(0, num_distances - 1)


ALIGNED_PRIOR_SLOPE = 8.0
"""Slope of the first head's initial bias ramp (``aligned_prior``): e^-8 leaves ~0.03% of its weight
one position off the aligned token, so that head starts reading the aligned tokens alone."""


def aligned_prior(heads: int, num_distances: int, aligned_distance: int | None) -> Tensor:
    """Initial relative-position biases [heads, num_distances]: zero, or with ``aligned_distance`` a
    ramp -slope * |distance - aligned| on the first half of the heads (slopes ``ALIGNED_PRIOR_SLOPE``
    / 4^head: 8, 2, 0.5, ...; ALiBi-like), the other half zero (content only).

    A neighbour that is a copy of the text holds the token a query predicts at a fixed distance (its
    continuation, aligned with the next chunk). With uniform attention over k*r keys the value path
    never sees that token often enough to learn to copy it, and the biases get no signal until it does;
    starting heads on the aligned key breaks that deadlock (the sharper the faster: on the oracle-mirrored
    Wikipedia the gap between retrieval on and off at step 100 is 0.13 nats with slope 1, 0.42 with 4,
    0.59 with 8; benchmarks/RESULTS-retrieval.md), and the biases stay learned.
    """
    bias = torch.zeros(heads, num_distances)
    if aligned_distance is not None:
        distance = (torch.arange(num_distances) - aligned_distance).abs().float()
        for head in range(max(1, heads // 2)):
            bias[head] = -distance * ALIGNED_PRIOR_SLOPE * 4.0**-head
    return bias


class CrossAttention(nn.Module):
    """Multi-head cross-attention from queries [B, t, dim] to a context [B, c, ctx_dim].

    With ``null_kv`` a learned key/value is prepended to every context, so a query whose context is all
    padding attends to it (and its output stays finite) instead of to nothing. ``positions`` (one of
    ``CROSS_POSITIONS``) adds position information to the attention scores: "relative" a learned bias
    per head and relative distance (``num_distances`` of them) plus previous-token keys (key j +
    ``key_shift[h]`` * key j-1 of the same segment: a query can match the token *before* the one it
    reads, which finds a copied neighbour by content; on at init on the heads whose bias starts at zero),
    "rotary" rotary embeddings on the first half of the heads (tables ``cos``/``sin`` passed to
    ``forward``). ``aligned_distance`` (the distance index of the key aligned with a query) starts the
    relative biases from ``aligned_prior``.
    """

    def __init__(
        self,
        dim: int,
        ctx_dim: int,
        heads: int,
        dropout: float,
        null_kv: bool,
        positions: str = "none",
        num_distances: int = 0,
        aligned_distance: int | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        self.null_kv = nn.Parameter(torch.zeros(2, dim)) if null_kv else None
        self.positions = positions
        self.rel_bias = self.key_shift = None
        if positions == "relative":
            self.rel_bias = nn.Parameter(aligned_prior(heads, num_distances, aligned_distance))
            # previous-token keys on the content heads (those the prior leaves at zero)
            self.key_shift = nn.Parameter((self.rel_bias.detach() == 0).all(dim=1).float())

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        norm: RMSNorm | None = None,
        pos: CrossPositions | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x [B, t, dim], context [B, c, ctx_dim], context_mask [B, c] (True = attend) -> [B, t, dim].

        ``norm`` is applied to x first (pre-norm), without keeping the normed x for the backward pass.
        ``pos`` (query and key positions) is required unless ``positions == "none"``; ``rotary`` the
        cos/sin tables [>= max position + 1, s/2] for "rotary".
        """
        bsz, t, dim = x.shape
        s = dim // self.heads
        q = project(x, self.q, norm).view(bsz, t, self.heads, s).transpose(1, 2)  # (B, h, t, s)
        k, v = kv_heads(self.kv(context), self.null_kv, self.heads)  # each (B, h, c', s), c' = [1 +] c
        first = 0 if self.null_kv is None else 1  # the null key has no position
        bias = None
        if self.positions == "rotary":
            cos, sin = rotary
            half = self.heads // 2
            q = torch.cat((apply_rotary(q[:, :half], cos[pos.query], sin[pos.query]), q[:, half:]), 1)
            k_pos = apply_rotary(k[:, :half, first:], cos[pos.key], sin[pos.key])
            k = torch.cat((torch.cat((k[:, :half, :first], k_pos), 2), k[:, half:]), 1)
        elif self.positions == "relative":
            body = k[:, :, first:]  # (B, h, c, s)
            has_prev = (pos.key > 0).to(k.dtype)[:, None]  # (c, 1): the key before is of the same segment
            previous = F.pad(body[:, :, :-1], (0, 0, 1, 0)) * has_prev
            body = body + self.key_shift.to(k.dtype)[None, :, None, None] * previous
            k = torch.cat((k[:, :, :first], body), 2)
            bias = self.rel_bias[:, pos.distance_index(self.rel_bias.shape[1])]  # (h, t, c)
            bias = F.pad(bias, (first, 0)).to(q.dtype)[None]  # (1, h, t, c')
        mask = bias
        if context_mask is not None:
            if self.null_kv is not None:
                context_mask = F.pad(context_mask, (1, 0), value=True)
            keep = context_mask[:, None, None, :]  # (B, 1, 1, c')
            mask = keep if bias is None else bias.masked_fill(~keep, float("-inf"))  # (B, h, t, c')
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(bsz, t, dim))


def cross_attention(
    config: RetroConfig, dim: int, ctx_dim: int, heads: int, null_kv: bool, aligned_distance: int
) -> CrossAttention:
    """A cross-attention of the model with ``config``'s position scheme: r + m - 1 relative distances
    between a query and a key, the one at index ``aligned_distance`` being the aligned key (where the
    prior of ``config.cross_position_init="aligned"`` peaks)."""
    return CrossAttention(
        dim,
        ctx_dim,
        heads,
        config.dropout,
        null_kv=null_kv,
        positions=config.cross_positions,
        num_distances=config.retrieved_len + config.chunk_len - 1,
        aligned_distance=aligned_distance if config.cross_position_init == "aligned" else None,
    )


CPU_FFN_PIECE_ELEMENTS = 4 * 1024 * 1024
"""Largest hidden activation (elements) a CPU feed-forward call creates at once: 16 MB in fp32."""


class FeedForward(nn.Module):
    """Position-wise MLP: dim -> hidden -> dim with GELU (``activation``: "gelu" or "gelu_tanh")."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.approximate = ACTIVATIONS[activation]

    def forward(self, x: Tensor, norm: RMSNorm | None = None) -> Tensor:
        """x [..., dim] -> [..., dim] (``norm``: apply it to x first).

        On CPU, rows are processed in pieces whose hidden activations stay under
        ``CPU_FFN_PIECE_ELEMENTS``: a larger tensor is a fresh memory map from the C allocator on every
        call, and filling it is page-fault bound (the neighbour encoder's [b*l*k*r, hidden] would be:
        its feed-forward forward + backward is 7-15% faster in 16 MB pieces at the benchmark shape).
        """
        rows = x.numel() // x.shape[-1]
        piece_rows = max(1, CPU_FFN_PIECE_ELEMENTS // self.up.out_features)
        if x.device.type != "cpu" or rows <= piece_rows:
            return self.dropout(self._mlp(x, norm))
        pieces = x.reshape(rows, x.shape[-1]).split(piece_rows)
        return self.dropout(torch.cat([self._mlp(p, norm) for p in pieces]).view(x.shape))

    def _mlp(self, x: Tensor, norm: RMSNorm | None) -> Tensor:
        """down(gelu(up(norm(x))))."""
        return gelu_linear(project(x, self.up, norm), self.down.weight, self.approximate)


class EncoderLayer(nn.Module):
    """Neighbour-encoder layer: bidirectional self-attention, cross-attention to the retrieving chunk, MLP."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        e = config.enc_width
        self.norm_attn = RMSNorm(e, config.norm_eps)
        self.attn = SelfAttention(e, config.enc_heads, config.dropout)
        self.norm_cross = RMSNorm(e, config.norm_eps)
        # chunk token i is aligned with neighbour token i: distance 0 (offset r - 1)
        self.cross = cross_attention(
            config, e, config.d_model, config.enc_heads, False, config.retrieved_len - 1
        )
        self.norm_ff = RMSNorm(e, config.norm_eps)
        self.ff = FeedForward(e, config.enc_ff_width, config.dropout, config.activation)

    def forward(
        self,
        x: Tensor,
        chunk_hidden: Tensor,
        k: int,
        cos: Tensor,
        sin: Tensor,
        key_mask: Tensor | None,
        pos: CrossPositions | None = None,
    ) -> Tensor:
        """x [b*l*k, r, e], chunk_hidden [b*l, m, d] (already normed), key_mask [b*l*k, r] -> [b*l*k, r, e].

        ``pos``: positions of the k*r neighbour tokens (queries) and m chunk tokens (keys); the
        rotary tables cos/sin [r, s/2] serve both attentions.
        """
        x = x + self.attn(x, cos, sin, causal=False, key_mask=key_mask, norm=self.norm_attn)
        bl_k, r, e = x.shape
        # All k neighbours of a chunk attend to the same chunk: fold k into the query axis instead of
        # repeating the chunk k times.
        queries = x.view(bl_k // k, k * r, e)  # (b*l, k*r, e)
        cross = self.cross(queries, chunk_hidden, norm=self.norm_cross, pos=pos, rotary=(cos, sin))
        x = x + cross.view(bl_k, r, e)
        return x + self.ff(x, norm=self.norm_ff)


class DecoderLayer(nn.Module):
    """Decoder layer: causal self-attention, optional chunked cross-attention, MLP (all pre-norm)."""

    def __init__(self, config: RetroConfig, has_cca: bool):
        super().__init__()
        d = config.d_model
        self.norm_attn = RMSNorm(d, config.norm_eps)
        self.attn = SelfAttention(d, config.n_heads, config.dropout)
        self.has_cca = has_cca
        if has_cca:
            self.norm_cca = RMSNorm(d, config.norm_eps)
            # a query's target is the continuation token one past it: distance +1 (offset 2m - 2)
            self.cca = cross_attention(
                config, d, config.enc_width, config.n_heads, True, 2 * config.chunk_len - 1
            )
        self.norm_ff = RMSNorm(d, config.norm_eps)
        self.ff = FeedForward(d, config.ff_width, config.dropout, config.activation)


@dataclass
class LayerCache:
    """Self-attention keys/values of the tokens processed so far (one decoder layer)."""

    k: Tensor | None = None
    v: Tensor | None = None


@dataclass
class DecodeCache:
    """State of incremental decoding: per-layer KV, the conditioning hidden states, encoded neighbours."""

    layers: list[LayerCache]
    length: int = 0
    """Tokens processed so far."""
    cond_hidden: Tensor | None = None
    """Normed hidden states [b, length, d] at the input of the first CCA layer (encoder conditioning)."""
    encoded: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    """chunk index -> (encoded neighbours [b, k, r, e], key mask [b, k*r] or None)."""


RETRIEVAL_MODULES = ("enc_in", "enc_cond_norm", "encoder.", "enc_norm")
"""Name prefixes of the ``Retro`` modules that only a retrieving model has (besides each CCA layer's
``cca``/``norm_cca``)."""


class Retro(nn.Module):
    """RETRO decoder with chunked cross-attention and a neighbour encoder (or the plain baseline)."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.config = config
        # One draw from the global generator seeds the initialisation; building the modules below draws
        # different amounts for RETRO and the baseline, so the global state is restored after it.
        init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        global_state = torch.get_rng_state()
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        cca = set(config.resolved_cca_layers)
        self.layers = nn.ModuleList(
            DecoderLayer(config, has_cca=(i + 1) in cca) for i in range(config.n_layers)
        )
        self.first_cca = min(cca) - 1 if cca else None  # 0-based layer whose input conditions the encoder
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.retrieval:
            e = config.enc_width
            self.enc_in = nn.Linear(d, e, bias=False) if e != d else nn.Identity()
            self.enc_cond_norm = RMSNorm(d, config.norm_eps)
            self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.enc_layers))
            self.enc_norm = RMSNorm(e, config.norm_eps)
            enc_cos, enc_sin = rotary_tables(config.retrieved_len, e // config.enc_heads, config.rope_base)
            self.register_buffer("enc_cos", enc_cos, persistent=False)
            self.register_buffer("enc_sin", enc_sin, persistent=False)
            if config.cross_positions == "rotary":  # decoder-head-size tables for CCA positions < r + m
                cca_cos, cca_sin = rotary_tables(
                    config.retrieved_len + config.chunk_len, d // config.n_heads, config.rope_base
                )
                self.register_buffer("cca_cos", cca_cos, persistent=False)
                self.register_buffer("cca_sin", cca_sin, persistent=False)
        cos, sin = rotary_tables(config.max_seq_len, d // config.n_heads, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if not self.embed.weight.is_meta:
            self.init_weights(init_seed)
        torch.set_rng_state(global_state)

    def is_retrieval_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the retrieval modules (neighbour encoder, chunked
        cross-attention), i.e. the parameters the decoder-only baseline does not have."""
        return name.startswith(RETRIEVAL_MODULES) or ".cca." in name or ".norm_cca." in name

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every linear and embedding weight from N(0, init_std), the residual output
        projections from N(0, init_std / sqrt(2 * n_layers)) (GPT-2), and the copy path
        (``init_copy_path``).

        Paired initialisation: the decoder's weights come from a generator seeded with ``seed`` in
        parameter order, the retrieval modules' from a generator of their own (seed + 1), so RETRO and
        the baseline built at the same seed start from the same decoder and a comparison at one seed
        measures retrieval alone.
        """
        decoder = torch.Generator().manual_seed(seed)
        retrieval = torch.Generator().manual_seed(seed + 1)
        linear_weights = {
            id(module.weight) for module in self.modules() if isinstance(module, (nn.Linear, nn.Embedding))
        }
        residual_std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():  # tied weights appear once
            if id(p) not in linear_weights:
                continue
            std = residual_std if name.endswith(("proj.weight", "down.weight")) else self.config.init_std
            generator = retrieval if self.is_retrieval_parameter(name) else decoder
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std))
        if self.config.retrieval and self.config.copy_init:
            self.init_copy_path(self.config.copy_init, retrieval)

    @torch.no_grad()
    def init_copy_path(self, strength: float, generator: torch.Generator | None = None) -> None:
        """Start the aligned-prior heads of every CCA layer as copiers of the token they attend to.

        Such a head h reads the encoded neighbour token one position ahead of its query (the token the
        query predicts, when the neighbour is a copy of the text). Its value projection becomes B_h^T
        (through the pseudo-inverse of ``enc_in`` when the encoder is narrower) and its output
        projection ``strength * init_std`` * B_h, for a random orthonormal basis B_h [d, head size]: at
        init the encoder's output is close to the normed token embedding, so the head adds that token's
        embedding, projected on B_h, to the residual stream, and the tied output layer scores the token
        up. Without it the value path must first learn to carry token identity before the position
        biases get any signal (on the oracle-mirrored Wikipedia: gap between retrieval on and off at
        step 100 0.59 nats at strength 0, 1.73 at 4, 2.05 at 16; benchmarks/RESULTS-retrieval.md).
        """
        d = self.config.d_model
        to_decoder = self.enc_in.weight.pinverse() if isinstance(self.enc_in, nn.Linear) else None  # (d, e)
        for layer in self.layers:
            cca = getattr(layer, "cca", None)
            if cca is None or cca.rel_bias is None:
                continue
            s = d // cca.heads
            for h in range(cca.heads):
                if not bool((cca.rel_bias[h] != 0).any()):  # a content head: left as initialised
                    continue
                draw = torch.randn(d, s, generator=generator)
                basis, _ = torch.linalg.qr(draw.to(cca.proj.weight.device))  # (d, s)
                value = basis.T if to_decoder is None else basis.T @ to_decoder  # (s, e)
                cca.kv.weight[d + h * s : d + (h + 1) * s] = value.to(cca.kv.weight.dtype)
                cca.proj.weight[:, h * s : (h + 1) * s] = (strength * self.config.init_std * basis).to(
                    cca.proj.weight.dtype
                )

    # ---- helpers -----------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (shared tensors counted once)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay for matrices of linear layers; none for norms, embeddings, null kv and
        position biases."""
        decay, no_decay = [], []
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix = (
                p.dim() == 2
                and not name.startswith("embed")
                and not name.endswith(("null_kv", "rel_bias", "key_shift"))
            )
            (decay if is_matrix else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _cca_positions(self, k: int, r: int, window_offsets: Tensor) -> CrossPositions:
        """Positions for chunked cross-attention: query i of an attending window (``window_offsets``,
        0..m-1) sits m-1+i tokens after the start of the chunk that retrieved; neighbour token j at j."""
        m = self.config.chunk_len
        keys = torch.arange(k * r, device=window_offsets.device) % r
        return CrossPositions(window_offsets + m - 1, keys, offset=2 * m - 2)

    def _encoder_positions(self, k: int, r: int, device: torch.device) -> CrossPositions:
        """Positions for the encoder's cross-attention: neighbour token j (query) at j, chunk token i at i."""
        queries = torch.arange(k * r, device=device) % r
        keys = torch.arange(self.config.chunk_len, device=device)
        return CrossPositions(queries, keys, offset=r - 1)

    def encode_neighbors(self, neighbors: Tensor, chunk_hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        """Encode neighbours conditioned on their retrieving chunks.

        neighbors [B, k, r] token ids (B = b*l chunks), chunk_hidden [B, m, d] (normed decoder states of
        each chunk) -> (encoded [B, k, r, e], key mask [B, k*r] with True = real token, or None if no
        padding).
        """
        cfg = self.config
        bsz, k, r = neighbors.shape
        flat = neighbors.reshape(bsz * k, r)  # (B*k, r)
        is_real = flat != cfg.pad_id
        key_mask = None if bool(is_real.all()) else is_real
        if key_mask is not None:
            # a neighbour that is all padding would have no key at all: let it see itself (its output is
            # masked out of the cross-attention below anyway)
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        x = self.enc_in(self.embed(flat))  # (B*k, r, e)
        cos, sin = self.enc_cos[:r], self.enc_sin[:r]
        pos = self._encoder_positions(k, r, flat.device)
        for layer in self.encoder:
            x = layer(x, chunk_hidden, k, cos, sin, key_mask, pos=pos)
        x = self.enc_norm(x).view(bsz, k, r, -1)  # (B, k, r, e)
        cca_mask = None if key_mask is None else is_real.view(bsz, k * r)
        return x, cca_mask

    def _cca(
        self, layer: DecoderLayer, x: Tensor, encoded: Tensor, mask: Tensor | None, window_offsets: Tensor
    ) -> Tensor:
        """One CCA layer for queries x [B, t, d] at ``window_offsets`` [t] of their attending windows,
        reading encoded neighbours [B, k, r, e] (mask [B, k*r] or None) -> [B, t, d]."""
        bsz, k, r, e = encoded.shape
        pos = self._cca_positions(k, r, window_offsets)
        rotary = (self.cca_cos, self.cca_sin) if self.config.cross_positions == "rotary" else None
        context = encoded.view(bsz, k * r, e)  # (B, k*r, e)
        return layer.cca(x, context, mask, norm=layer.norm_cca, pos=pos, rotary=rotary)

    def _chunked_cross_attention(
        self, layer: DecoderLayer, h: Tensor, encoded: Tensor, cca_mask: Tensor | None
    ) -> Tensor:
        """The CCA residual for h [b, n, d] given encoded neighbours [b*l, k, r, e] of l chunks.

        Tokens m-1 .. m-1 + l*m - 1 (shifted by chunk_len - 1) form l attending windows of m tokens;
        window u attends to chunk u's neighbours. Tokens before m-1 get no CCA (zero residual).
        """
        m = self.config.chunk_len
        b, n, d = h.shape
        num_chunks = encoded.shape[0] // b
        window = h[:, m - 1 : m - 1 + num_chunks * m]  # (b, <= l*m, d)
        used = window.shape[1]
        window = F.pad(window, (0, 0, 0, num_chunks * m - used)).reshape(b * num_chunks, m, d)  # (b*l, m, d)
        out = self._cca(layer, window, encoded, cca_mask, torch.arange(m, device=h.device))  # (b*l, m, d)
        out = out.view(b, num_chunks * m, d)[:, :used]
        return F.pad(out, (0, 0, m - 1, n - (m - 1) - used))  # (b, n, d)

    # ---- training / scoring ------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        neighbors: Tensor | None = None,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """tokens [b, n], neighbors [b, l, k, r] (l = n // m complete chunks; extra chunks are ignored)
        or None (retrieval off), targets [b, n], loss_mask [b, n] (0 = ignore) -> (logits [b, n, V], loss).

        With targets and ``return_logits=False`` (what training and evaluation need) the logits are
        never materialised: the loss is computed ``config.loss_chunk_tokens`` rows at a time
        (``retro_model.loss.linear_cross_entropy``, same value and gradients) and logits is None.
        """
        cfg = self.config
        b, n = tokens.shape
        if n > cfg.max_seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_seq_len={cfg.max_seq_len}")
        m = cfg.chunk_len
        num_chunks = n // m
        use_retrieval = cfg.retrieval and neighbors is not None and num_chunks > 0
        if (
            neighbors is not None
            and cfg.retrieval
            and (neighbors.dim() != 4 or neighbors.shape[0] != b or neighbors.shape[1] < num_chunks)
        ):
            raise ValueError(
                f"neighbors must be [b={b}, l>={num_chunks}, k, r] for {n} tokens, got {tuple(neighbors.shape)}"
            )
        cos, sin = self.cos[:n], self.sin[:n]
        h = self.embed(tokens)  # (b, n, d)
        encoded = cca_mask = None
        for layer in self.layers:
            h = h + layer.attn(h, cos, sin, causal=True, norm=layer.norm_attn)
            if use_retrieval and layer.has_cca:
                if encoded is None:
                    # condition on the hidden states of each complete chunk (input of the first CCA layer)
                    chunks = self.enc_cond_norm(h[:, : num_chunks * m]).reshape(b * num_chunks, m, -1)
                    nbrs = neighbors[:, :num_chunks].reshape(b * num_chunks, *neighbors.shape[2:])
                    encoded, cca_mask = self.encode_neighbors(nbrs, chunks)
                h = h + self._chunked_cross_attention(layer, h, encoded, cca_mask)
            h = h + layer.ff(h, norm=layer.norm_ff)
        h = self.norm(h)
        if targets is None:
            return self.head(h), None
        ignore = targets == cfg.pad_id
        if loss_mask is not None:
            ignore = ignore | (loss_mask == 0)
        targets = targets.masked_fill(ignore, IGNORE_INDEX).reshape(-1)  # (b*n,)
        if not return_logits:
            hidden = h.reshape(b * n, -1)  # (b*n, d)
            return None, linear_cross_entropy(hidden, self.head.weight, targets, cfg.loss_chunk_tokens)
        logits = self.head(h)  # (b, n, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX
        )
        return logits, loss

    # ---- incremental decoding ----------------------------------------------------------------------
    def new_cache(self) -> DecodeCache:
        """An empty cache for ``forward_incremental``."""
        return DecodeCache(layers=[LayerCache() for _ in self.layers])

    @torch.no_grad()
    def forward_incremental(
        self, tokens: Tensor, cache: DecodeCache, neighbors: dict[int, Tensor] | None = None
    ) -> Tensor:
        """Process new tokens [b, t] after the ``cache.length`` cached ones -> logits [b, t, V].

        ``neighbors`` maps a chunk index u to its neighbours [b, k, r]; it must hold every chunk that
        completes within these tokens and whose neighbours the new tokens may attend to (a chunk that
        completes at the last new token is attended by that token). Gives the same logits as
        ``forward`` on the whole sequence.
        """
        cfg = self.config
        b, t = tokens.shape
        start = cache.length
        end = start + t
        if end > cfg.max_seq_len:
            raise ValueError(f"decoding past max_seq_len={cfg.max_seq_len}; raise model.max_seq_len")
        m = cfg.chunk_len
        cos, sin = self.cos[start:end], self.sin[start:end]
        positions = torch.arange(start, end)
        attended_chunk = (positions + 1) // m - 1  # chunk whose neighbours position p attends (-1: none)
        h = self.embed(tokens)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers, strict=True)):
            h = h + layer.attn(layer.norm_attn(h), cos, sin, causal=True, cache=layer_cache)
            if cfg.retrieval and i == self.first_cca:
                cond = self.enc_cond_norm(h)
                cache.cond_hidden = (
                    cond if cache.cond_hidden is None else torch.cat((cache.cond_hidden, cond), 1)
                )
                for u in range(start // m, end // m):  # chunks completed by these tokens
                    if neighbors is not None and u in neighbors and u not in cache.encoded:
                        chunk = cache.cond_hidden[:, u * m : (u + 1) * m]  # (b, m, d)
                        cache.encoded[u] = self.encode_neighbors(neighbors[u], chunk)
            if cfg.retrieval and layer.has_cca:
                residual = torch.zeros_like(h)
                for u in attended_chunk.unique().tolist():
                    if u < 0 or u not in cache.encoded:
                        continue
                    sel = (attended_chunk == u).nonzero().squeeze(1)
                    encoded, mask = cache.encoded[u]
                    offsets = positions[sel] - ((u + 1) * m - 1)  # offsets within chunk u's window
                    residual[:, sel] = self._cca(layer, h[:, sel], encoded, mask, offsets)
                h = h + residual
            h = h + layer.ff(layer.norm_ff(h))
        cache.length = end
        return self.head(self.norm(h))
