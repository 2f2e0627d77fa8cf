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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

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
        cache: LayerCache | RowsKV | None = None,
        norm: RMSNorm | None = None,
    ) -> Tensor:
        """x [B, t, dim] -> [B, t, dim] (``norm``: apply it to x first, as a pre-norm layer does).

        cos/sin [t, s/2] rotate the t tokens (or [B, t, s/2]: each row at its own positions). key_mask
        [B, t] (True = attend) masks padding keys (bidirectional use). With ``cache`` the t new tokens
        follow the cached ones: ``cache.update`` stores their keys/values and returns every key/value
        they attend to, with the mask that keeps each token from later (or padding) positions.
        """
        bsz, t, dim = x.shape
        qkv = project(x, self.qkv, norm).view(bsz, t, 3, self.heads, dim // self.heads)
        q, k, v = rotary_qkv(qkv, cos, sin)  # each (B, h, t, s)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v, causal)
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

    The queries may also be [B, t]: each row of the batch at its own positions (batched decoding).
    ``offset`` makes ``key - query + offset`` an index into a table of relative distances
    (``config.cross_positions == "relative"``).
    """

    query: Tensor
    key: Tensor
    offset: int

    def distance_index(self, num_distances: int) -> Tensor:
        """[t, c] (or [B, t, c]) index of each (query, key) pair's relative distance in a table of
        ``num_distances``."""
        return (self.key - self.query.unsqueeze(-1) + self.offset).clamp(0, num_distances - 1)


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
        k, v = self.context_kv(context, pos, rotary)
        return self.attend(x, k, v, context_mask, norm, pos, rotary)

    def context_kv(
        self, context: Tensor, pos: CrossPositions | None = None, rotary: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys and values [B, h, c', s] of a context [B, c, ctx_dim] (c' = 1 + c with the null key/value
        first), with the key positions applied ("rotary": rotated keys; "relative": previous-token keys).

        They depend on ``pos.key`` only, so a context that many queries read (a chunk's neighbours, read
        by the m tokens of its attending window during decoding) is projected once and passed to ``attend``.
        """
        k, v = kv_heads(self.kv(context), self.null_kv, self.heads)  # each (B, h, c', s), c' = [1 +] c
        first = 0 if self.null_kv is None else 1  # the null key has no position
        if self.positions == "rotary":
            cos, sin = rotary
            half = self.heads // 2
            k_pos = apply_rotary(k[:, :half, first:], cos[pos.key], sin[pos.key])
            k = torch.cat((torch.cat((k[:, :half, :first], k_pos), 2), k[:, half:]), 1)
        elif self.positions == "relative":
            body = k[:, :, first:]  # (B, h, c, s)
            has_prev = (pos.key > 0).to(k.dtype)[:, None]  # (c, 1): the key before is of the same segment
            previous = F.pad(body[:, :, :-1], (0, 0, 1, 0)) * has_prev
            body = body + self.key_shift.to(k.dtype)[None, :, None, None] * previous
            k = torch.cat((k[:, :, :first], body), 2)
        return k, v

    def attend(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        context_mask: Tensor | None = None,
        norm: RMSNorm | None = None,
        pos: CrossPositions | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Queries x [B, t, dim] attend to keys/values [B, h, c', s] from ``context_kv`` -> [B, t, dim].

        context_mask [B, c] (True = attend) masks the context tokens (never the null key). ``pos`` holds
        the query positions, [t] or [B, t] (each row at its own positions), and the key positions.
        """
        bsz, t, dim = x.shape
        s = dim // self.heads
        q = project(x, self.q, norm).view(bsz, t, self.heads, s).transpose(1, 2)  # (B, h, t, s)
        first = 0 if self.null_kv is None else 1  # the null key has no position
        bias = None
        if self.positions == "rotary":
            cos, sin = rotary
            cos, sin = cos[pos.query], sin[pos.query]  # (t, s/2) or (B, t, s/2)
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, t, s/2) against (B, h, t, s/2)
            half = self.heads // 2
            q = torch.cat((apply_rotary(q[:, :half], cos, sin), q[:, half:]), 1)
        elif self.positions == "relative":
            bias = self.rel_bias[:, pos.distance_index(self.rel_bias.shape[1])]  # (h, t, c) or (h, B, t, c)
            bias = bias[None] if bias.dim() == 3 else bias.transpose(0, 1)  # (1 or B, h, t, c)
            bias = F.pad(bias, (first, 0)).to(q.dtype)  # (1 or B, h, t, c')
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

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: LayerCache | RowsKV | None = None,
        cross: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """h [B, t, d] -> [B, t, d]: causal self-attention, chunked cross-attention, MLP (pre-norm residuals).

        cos/sin: rotary tables of the t positions ([t, s/2], or [B, t, s/2] with each row at its own
        positions). ``cache``: this layer's self-attention keys/values of the earlier tokens (None: the
        t tokens are the whole sequence). ``cross``: the chunked cross-attention residual as a function
        of the hidden states after self-attention (each caller knows which neighbours its tokens
        read); None, or a layer without CCA, adds none.
        """
        h = h + self.attn(h, cos, sin, causal=True, cache=cache, norm=self.norm_attn)
        if cross is not None and self.has_cca:
            h = h + cross(h)
        return h + self.ff(h, norm=self.norm_ff)


@dataclass
class LayerCache:
    """Self-attention keys/values of the tokens processed so far (one decoder layer)."""

    k: Tensor | None = None
    v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append the keys/values [b, h, t, s] of t new tokens -> (every key, every value, mask [t,
        past + t] (True = attend) or None when nothing needs masking)."""
        t = k.shape[2]
        if self.k is not None:
            k = torch.cat((self.k, k), dim=2)
            v = torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        past = k.shape[2] - t
        mask = None
        if causal and t > 1:
            # new token i (absolute past + i) sees keys 0 .. past + i
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=k.device).tril(diagonal=past)
        return k, v, mask


@dataclass
class RowsKV:
    """One decoder layer's keys/values of the rows of a ``DecodeBatch`` during one ``decode_step``:
    every row gets one new token at its own position, written in place into the layer's padded store."""

    keys: Tensor
    """The layer's key store [rows capacity, h, length capacity, s]."""
    values: Tensor
    """The layer's value store, same shape."""
    positions: Tensor
    """[b] position of each row's new token (its length before the step)."""
    key_mask: Tensor
    """[b, 1, 1, T] True for the keys row i attends (0 .. positions[i]); T = longest row + 1."""

    def update(self, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys/values [b, h, 1, s] at each row's position -> (keys, values [b, h, T, s],
        the padding and causal mask)."""
        b, t = k.shape[0], self.key_mask.shape[-1]
        rows = torch.arange(b, device=k.device)
        self.keys[rows, :, self.positions] = k[:, :, 0]  # (b, h, s) written at (row, :, position)
        self.values[rows, :, self.positions] = v[:, :, 0]
        return self.keys[:b, :, :t], self.values[:b, :, :t], self.key_mask


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
    cross_kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    """(decoder layer, chunk index) -> that layer's CCA keys/values [b, h, 1 + k*r, s] of the chunk's
    encoded neighbours: projected once per chunk, not once per token (chunks no later token reads
    are dropped)."""


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
        0..m-1, [t] or [B, t]) sits m-1+i tokens after the start of the chunk that retrieved; neighbour
        token j at j."""
        m = self.config.chunk_len
        keys = torch.arange(k * r, device=window_offsets.device) % r
        return CrossPositions(window_offsets + m - 1, keys, offset=2 * m - 2)

    def _cca_rotary(self) -> tuple[Tensor, Tensor] | None:
        """The CCA's rotary tables (``cross_positions == "rotary"``), else None."""
        return (self.cca_cos, self.cca_sin) if self.config.cross_positions == "rotary" else None

    def _cca_context(self, layer: DecoderLayer, encoded: Tensor) -> tuple[Tensor, Tensor]:
        """A CCA layer's keys/values [B, h, 1 + k*r, s] of encoded neighbours [B, k, r, e]."""
        bsz, k, r, e = encoded.shape
        pos = self._cca_positions(k, r, torch.zeros(1, dtype=torch.long, device=encoded.device))
        return layer.cca.context_kv(encoded.reshape(bsz, k * r, e), pos, self._cca_rotary())

    def _cca_read(
        self,
        layer: DecoderLayer,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        mask: Tensor | None,
        neighbor_shape: tuple[int, int],
        window_offsets: Tensor,
    ) -> Tensor:
        """One CCA layer for queries x [B, t, d] at ``window_offsets`` ([t], or [B, t] per row) of their
        attending windows, reading the keys/values ``_cca_context`` made of encoded neighbours of
        ``neighbor_shape`` (k, r) (mask [B, k*r] or None) -> [B, t, d]."""
        pos = self._cca_positions(*neighbor_shape, window_offsets)
        return layer.cca.attend(x, *kv, mask, norm=layer.norm_cca, pos=pos, rotary=self._cca_rotary())

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
        context = encoded.view(bsz, k * r, e)  # (B, k*r, e)
        return layer.cca(x, context, mask, norm=layer.norm_cca, pos=pos, rotary=self._cca_rotary())

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
        encoded: list[tuple[Tensor, Tensor | None]] = []  # (encoded neighbours, mask), once computed

        def cross(layer: DecoderLayer, h: Tensor) -> Tensor:
            if not encoded:
                # condition on the hidden states of each complete chunk (input of the first CCA layer)
                chunks = self.enc_cond_norm(h[:, : num_chunks * m]).reshape(b * num_chunks, m, -1)
                nbrs = neighbors[:, :num_chunks].reshape(b * num_chunks, *neighbors.shape[2:])
                encoded.append(self.encode_neighbors(nbrs, chunks))
            return self._chunked_cross_attention(layer, h, *encoded[0])

        for layer in self.layers:
            h = layer(h, cos, sin, cross=partial(cross, layer) if use_retrieval else None)
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

        def cross(i: int, h: Tensor) -> Tensor:
            if i == self.first_cca:
                cond = self.enc_cond_norm(h)
                cache.cond_hidden = (
                    cond if cache.cond_hidden is None else torch.cat((cache.cond_hidden, cond), 1)
                )
                for u in range(start // m, end // m):  # chunks completed by these tokens
                    if neighbors is not None and u in neighbors and u not in cache.encoded:
                        chunk = cache.cond_hidden[:, u * m : (u + 1) * m]  # (b, m, d)
                        cache.encoded[u] = self.encode_neighbors(neighbors[u], chunk)
            layer = self.layers[i]
            residual = torch.zeros_like(h)
            for u in attended_chunk.unique().tolist():
                if u < 0 or u not in cache.encoded:
                    continue
                sel = (attended_chunk == u).nonzero().squeeze(1)
                encoded, mask = cache.encoded[u]
                kv = cache.cross_kv.get((i, u))
                if kv is None:
                    kv = cache.cross_kv[(i, u)] = self._cca_context(layer, encoded)
                offsets = positions[sel] - ((u + 1) * m - 1)  # offsets within chunk u's window
                residual[:, sel] = self._cca_read(layer, h[:, sel], kv, mask, encoded.shape[1:3], offsets)
            return residual

        h = self.embed(tokens)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers, strict=True)):
            h = layer(h, cos, sin, cache=layer_cache, cross=partial(cross, i) if cfg.retrieval else None)
        cache.length = end
        for key in [key for key in cache.cross_kv if key[1] < end // m - 1]:
            del cache.cross_kv[key]  # no later token reads chunks before the one its position attends
        return self.head(self.norm(h))

    # ---- batched decoding (sequences at their own lengths) ----------------------------------------------
    def new_batch(self) -> DecodeBatch:
        """An empty ``DecodeBatch`` for ``decode_step``."""
        return DecodeBatch(self)

    @torch.inference_mode()
    def decode_step(
        self,
        tokens: Tensor,
        batch: DecodeBatch,
        neighbors: Sequence[Mapping[int, Tensor] | None] | None = None,
    ) -> Tensor:
        """Feed one new token to every sequence of ``batch`` in one forward pass -> logits [b, V].

        tokens [b]: row i's next token, at position ``batch.lengths[i]`` (rows may have any lengths).
        ``neighbors[i]`` maps a chunk index to row i's neighbours [k, r] (or [1, k, r]); it must hold the
        chunk that row i's token completes, if any and if that row retrieves (the token attends to them
        at once, as in ``forward_incremental``); other entries are ignored. Every row must retrieve the
        same k and r. Each row gets the logits ``forward_incremental`` gives its sequence alone (up to
        float rounding): its keys/values are padded to the longest row's and the padding is masked, its
        rotary angles are its own, its CCA reads its own chunk's neighbours, and a row that completes a
        chunk encodes that chunk's neighbours conditioned on its own hidden states.
        """
        cfg = self.config
        n = len(batch)
        if batch.model is not self:
            raise ValueError("decode_step needs a DecodeBatch of this model (model.new_batch())")
        if tokens.shape != (n,):
            raise ValueError(f"tokens must be [b={n}] (one per row of the batch), got {tuple(tokens.shape)}")
        if neighbors is not None and len(neighbors) != n:
            raise ValueError(f"neighbors must hold one mapping per row ({n}), got {len(neighbors)}")
        if n == 0:
            return self.head.weight.new_empty(0, cfg.vocab_size)
        lengths = list(batch.lengths)
        longest = max(lengths)
        if longest + 1 > cfg.max_seq_len:
            raise ValueError(f"decoding past max_seq_len={cfg.max_seq_len}; raise model.max_seq_len")
        batch.reserve(n, longest + 1)
        device = tokens.device
        positions = torch.tensor(lengths, device=device)
        key_mask = (torch.arange(longest + 1, device=device) <= positions[:, None])[:, None, None]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (b, 1, s/2): per row
        reading: list[_Reading] = []  # set at the first CCA layer

        def cross(i: int, h: Tensor) -> Tensor:
            if i == self.first_cca:
                reading.append(self._decode_condition(h, batch, lengths, positions, neighbors))
            read = reading[0]
            if read.rows is None:  # no row reads neighbours at this step
                return torch.zeros_like(h)
            keys, values = batch.context[i]
            mask = None if read.unpadded else batch.context_mask[:n]
            kv = (keys[:n], values[:n])
            out = self._cca_read(self.layers[i], h, kv, mask, batch.neighbor_shape, read.offsets[:, None])
            return out if read.everyone else torch.where(read.rows[:, None, None], out, 0.0)

        h = self.embed(tokens)[:, None]  # (b, 1, d)
        for i, layer in enumerate(self.layers):
            kv = RowsKV(batch.keys[i], batch.values[i], positions, key_mask)
            h = layer(h, cos, sin, cache=kv, cross=partial(cross, i) if cfg.retrieval else None)
        batch.lengths = [length + 1 for length in lengths]
        return self.head(self.norm(h[:, 0]))

    def _decode_condition(
        self,
        h: Tensor,
        batch: DecodeBatch,
        lengths: list[int],
        positions: Tensor,
        neighbors: Sequence[Mapping[int, Tensor] | None] | None,
    ) -> _Reading:
        """At the first CCA layer of a decode step: store each row's conditioning hidden state, encode
        the neighbours of the chunks rows complete -> which rows read neighbours at this step."""
        m = self.config.chunk_len
        n = len(lengths)
        rows = torch.arange(n, device=h.device)
        batch.cond[rows, positions % m] = self.enc_cond_norm(h[:, 0])
        completing: dict[tuple[int, int], list[tuple[int, int, Tensor]]] = {}  # neighbour shape -> rows
        for row, length in enumerate(lengths):
            u = length // m
            if (length + 1) % m or neighbors is None or not neighbors[row] or u not in neighbors[row]:
                continue
            nbrs = neighbors[row][u]
            nbrs = nbrs.reshape(nbrs.shape[-2:]).to(h.device)
            completing.setdefault(tuple(nbrs.shape), []).append((row, u, nbrs))
        for group in completing.values():
            index = torch.tensor([row for row, _, _ in group], device=h.device)
            encoded, mask = self.encode_neighbors(torch.stack([x for _, _, x in group]), batch.cond[index])
            batch.set_context([row for row, _, _ in group], [u for _, u, _ in group], encoded, mask)
        attended = [(length + 1) // m - 1 for length in lengths]
        reads = [u >= 0 and batch.context_chunk[row] == u for row, u in enumerate(attended)]
        offsets = [
            length - ((u + 1) * m - 1) if read else 0
            for length, u, read in zip(lengths, attended, reads, strict=True)
        ]
        return _Reading(
            rows=torch.tensor(reads, device=h.device) if any(reads) else None,
            offsets=torch.tensor(offsets, device=h.device),
            everyone=all(reads),
            unpadded=all(batch.context_full[row] for row, read in enumerate(reads) if read),
        )


@dataclass
class _Reading:
    """Which rows of a decode step read neighbours (their chunk's are encoded) and where."""

    rows: Tensor | None
    """[b] True for the rows that read; None when no row does."""
    offsets: Tensor
    """[b] each reading row's offset in its chunk's attending window (0 for the others)."""
    everyone: bool
    """Every row reads."""
    unpadded: bool
    """No reading row's neighbours hold padding (the CCA needs no mask)."""


class DecodeBatch:
    """Decoding state of several sequences, each at its own length, stepped together by
    ``Retro.decode_step`` (one forward pass per step for all of them).

    Row i is one sequence: its self-attention keys/values (positions 0 .. lengths[i]-1 of a padded
    store [rows, h, capacity, s] per layer; decode_step masks the rest), the conditioning hidden states
    of its current chunk [m, d], and the CCA keys/values of the neighbours its next tokens read (chunk
    ``context_chunk[i]``, -1 for none). A sequence enters with ``add`` (its prompt prefilled by
    ``Retro.forward_incremental`` into a one-sequence ``DecodeCache``) and leaves with ``remove`` (the
    last row moves into its place). The stores grow (doubling) as rows and lengths need; a step writes
    one position per row in place, so it copies no cache. The stores are inference tensors: every
    method and ``decode_step`` runs in ``torch.inference_mode``, whatever the caller's mode.
    """

    def __init__(self, model: Retro):
        self.model = model
        cfg = model.config
        self.lengths: list[int] = []
        """Tokens each row has processed (its next token's position)."""
        self.context_chunk: list[int] = []
        """Chunk whose neighbours each row's CCA stores hold (-1: none yet)."""
        self.context_full: list[bool] = []
        """Whether each row's neighbours are free of padding (its CCA mask is all True)."""
        self.neighbor_shape: tuple[int, int] | None = None
        """(k, r) of every row's neighbours, fixed by the first encoded."""
        self._weight = model.embed.weight
        self._heads = cfg.n_heads
        self._head_size = cfg.d_model // cfg.n_heads
        self._rows = self._length = 0  # capacities
        self.keys: list[Tensor] = []
        """Per decoder layer, the key store [rows capacity, h, length capacity, s]."""
        self.values: list[Tensor] = []
        """Per decoder layer, the value store (same shape)."""
        self.cond = self._zeros(0, cfg.chunk_len, cfg.d_model)
        """[rows capacity, m, d] normed hidden states of each row's current chunk (encoder conditioning)."""
        self.context: dict[int, tuple[Tensor, Tensor]] = {}
        """CCA decoder layer -> keys, values [rows capacity, h, 1 + k*r, s] of each row's neighbours."""
        self.context_mask = self._zeros(0, 0, dtype=torch.bool)
        """[rows capacity, k*r] True for the real (not padding) neighbour tokens of each row."""

    def __len__(self) -> int:
        """Number of sequences (rows)."""
        return len(self.lengths)

    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.zeros(shape, dtype=dtype or self._weight.dtype, device=self._weight.device)

    @staticmethod
    def _grown(store: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A zero tensor of ``shape`` holding ``store`` in its leading corner."""
        out = store.new_zeros(shape)
        out[tuple(slice(0, size) for size in store.shape)] = store
        return out

    @torch.inference_mode()
    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` sequences of up to ``length`` tokens (capacities at least double)."""
        if rows <= self._rows and length <= self._length:
            return
        cfg = self.model.config
        if rows > self._rows:
            self._rows = max(rows, 2 * self._rows, 4)
        if length > self._length:
            m = cfg.chunk_len
            grown = max(length, 2 * self._length, m)
            self._length = min(cfg.max_seq_len, -(-grown // m) * m)  # whole chunks, up to max_seq_len
        shape = (self._rows, self._heads, self._length, self._head_size)
        if not self.keys:
            self.keys = [self._zeros(*shape) for _ in self.model.layers]
            self.values = [self._zeros(*shape) for _ in self.model.layers]
        else:
            self.keys = [self._grown(store, shape) for store in self.keys]
            self.values = [self._grown(store, shape) for store in self.values]
        self.cond = self._grown(self.cond, (self._rows, *self.cond.shape[1:]))
        self.context_mask = self._grown(self.context_mask, (self._rows, self.context_mask.shape[1]))
        self.context = {
            i: tuple(self._grown(store, (self._rows, *store.shape[1:])) for store in kv)
            for i, kv in self.context.items()
        }

    @torch.inference_mode()
    def add(self, cache: DecodeCache) -> int:
        """Add a sequence from the ``DecodeCache`` of its prefill (one sequence, at least one token,
        made by ``forward_incremental`` of this model) -> its row (the last). The cache is not changed."""
        model, cfg = self.model, self.model.config
        m = cfg.chunk_len
        length = cache.length
        first = cache.layers[0].k
        if length < 1 or first is None or first.shape[0] != 1:
            raise ValueError("DecodeBatch.add takes the DecodeCache of one prefilled sequence")
        if length >= cfg.max_seq_len:
            raise ValueError(
                f"a sequence of {length} tokens has no room left (max_seq_len={cfg.max_seq_len})"
            )
        row = len(self)
        self.reserve(row + 1, length + 1)
        for keys, values, layer_cache in zip(self.keys, self.values, cache.layers, strict=True):
            keys[row, :, :length] = layer_cache.k[0]
            values[row, :, :length] = layer_cache.v[0]
        self.lengths.append(length)
        self.context_chunk.append(-1)
        self.context_full.append(True)
        if cfg.retrieval:
            start = length // m * m
            self.cond[row, : length - start] = cache.cond_hidden[0, start:length]
            u = (length + 1) // m - 1  # the chunk the next token reads (encoded if it is complete)
            if u >= 0 and u in cache.encoded:
                encoded, mask = cache.encoded[u]
                kvs = {}
                for i, layer in enumerate(model.layers):
                    if layer.has_cca:
                        kvs[i] = cache.cross_kv.get((i, u)) or model._cca_context(layer, encoded)
                self.set_context([row], [u], encoded, mask, kvs)
        return row

    @torch.inference_mode()
    def set_context(
        self,
        rows: list[int],
        chunks: list[int],
        encoded: Tensor,
        mask: Tensor | None,
        kvs: dict[int, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Give ``rows`` the encoded neighbours [len(rows), k, r, e] (mask [len(rows), k*r] or None) of
        their ``chunks``: every CCA layer's keys/values of them (``kvs``, computed unless given)."""
        model = self.model
        _, k, r, _ = encoded.shape
        if self.neighbor_shape is None:
            self.neighbor_shape = (k, r)
            self.context_mask = self._zeros(self._rows, k * r, dtype=torch.bool)
            c = 1 + k * r  # with the null key
            for i, layer in enumerate(model.layers):
                if layer.has_cca:
                    shape = (self._rows, self._heads, c, self._head_size)
                    self.context[i] = (self._zeros(*shape), self._zeros(*shape))
        elif self.neighbor_shape != (k, r):
            raise ValueError(
                f"every sequence of a batch must retrieve the same number of neighbours and tokens "
                f"(k, r) = {self.neighbor_shape}, got {(k, r)}"
            )
        index = torch.tensor(rows, device=encoded.device)
        for i, (keys, values) in self.context.items():
            kv = kvs[i] if kvs is not None else model._cca_context(model.layers[i], encoded)
            keys[index] = kv[0].to(keys.dtype)
            values[index] = kv[1].to(values.dtype)
        self.context_mask[index] = True if mask is None else mask
        for j, (row, u) in enumerate(zip(rows, chunks, strict=True)):
            self.context_chunk[row] = u
            self.context_full[row] = mask is None or bool(mask[j].all())

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Drop the sequence of ``row``; the last row moves into its place (the others keep theirs)."""
        last = len(self) - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} out of range for a batch of {len(self)}")
        if row != last:
            length = self.lengths[last]
            for store in (*self.keys, *self.values):
                store[row, :, :length] = store[last, :, :length]
            for store in (self.cond, self.context_mask, *(s for kv in self.context.values() for s in kv)):
                store[row] = store[last]
            for values in (self.lengths, self.context_chunk, self.context_full):
                values[row] = values[last]
        for values in (self.lengths, self.context_chunk, self.context_full):
            values.pop()
