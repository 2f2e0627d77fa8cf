"""RetroConfig: every hyperparameter that shapes a Retro model, validated on construction.

Shape legend used across the package:
    b  batch size
    n  sequence length (tokens), n = l * m (+ a partial last chunk during generation)
    l  number of chunks in a sequence
    m  chunk length (``chunk_len``, 64 in the paper)
    k  neighbours retrieved per chunk (``num_neighbors``)
    r  tokens per neighbour (``neighbor_len``): the neighbour chunk + its continuation, 2 * m
    d  decoder width (``d_model``); d' = encoder width (``enc_d_model``)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def paper_cca_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's rule for which decoder layers (1-based) carry chunked cross-attention.

    RETRO puts CCA in every 3rd layer starting from layer 6 (6, 9, 12, ...). Shallow models scale the
    start down to the middle of the stack so they still get at least one CCA layer and keep the
    every-3rd spacing: 6 layers -> (3, 6), 4 layers -> (2,), 2 layers -> (1,), 12 layers -> (6, 9, 12).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    start = min(6, max(1, n_layers // 2))
    return tuple(range(start, n_layers + 1, 3))


ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
"""Feed-forward activation name -> the ``approximate`` argument of ``torch.nn.functional.gelu``."""

CROSS_POSITIONS = ("none", "relative", "rotary")
"""Position schemes of the two cross-attentions (decoder chunk -> neighbours, neighbour -> its chunk):
"none": content only (every checkpoint written before ``RetroConfig.cross_positions`` existed);
"relative": a learned bias per head and relative distance between query and key token (see
``RetroConfig.cross_position_init``), and previous-token keys (each key also carries the key of the
token before it, so a query matches a copied neighbour by the token it has just read);
"rotary": rotary position embeddings on half of the heads (the other half stay content-only)."""

ALIGNMENTS = ("none", "match")
"""How neighbour windows are placed (``RetroConfig.neighbor_alignment``): "none" = the retrieved chunk
and its continuation (the paper); "match" = ``retro_model.alignment.align_windows``."""

COPY_INIT_STRENGTH = 16.0
"""Default ``RetroConfig.copy_init`` (benchmarks/RESULTS-retrieval.md: the strength sweep)."""


@dataclass
class RetroConfig:
    """Hyperparameters of a Retro model (decoder + chunked cross-attention + neighbour encoder)."""

    vocab_size: int = 8192
    """Number of token ids; must match the database's tokenizer."""
    d_model: int = 256
    """Decoder width d."""
    n_heads: int = 4
    """Attention heads in the decoder (self-attention and chunked cross-attention)."""
    n_layers: int = 6
    """Decoder layers."""
    d_ff: int | None = None
    """Decoder feed-forward hidden width; None means 4 * d_model."""
    chunk_len: int = 64
    """Retrieval chunk length m: the decoder retrieves once per m tokens."""
    cca_layers: tuple[int, ...] | None = None
    """1-based decoder layers with chunked cross-attention; None applies ``paper_cca_layers``."""
    enc_layers: int = 2
    """Neighbour-encoder layers."""
    enc_d_model: int | None = None
    """Neighbour-encoder width d' (the paper uses 896 beside a wider decoder); None means d_model."""
    enc_n_heads: int | None = None
    """Neighbour-encoder attention heads; None means n_heads."""
    enc_d_ff: int | None = None
    """Neighbour-encoder feed-forward width; None means 4 * enc_d_model."""
    num_neighbors: int = 2
    """Neighbours k retrieved per chunk."""
    neighbor_len: int | None = None
    """Tokens r per neighbour (neighbour chunk + continuation); None means 2 * chunk_len."""
    activation: str = "gelu"
    """Feed-forward activation: "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation, which
    checkpoints written before this field existed use)."""
    cross_positions: str = "relative"
    """How the cross-attentions see token positions: one of ``CROSS_POSITIONS``. Query token i of chunk
    u's attending window sits at position m-1+i relative to chunk u, neighbour token j at position j of
    its neighbour, so an aligned copy is a fixed relative distance away."""
    cross_position_init: str = "aligned"
    """Initial relative-position biases (``cross_positions="relative"``): "zero", or "aligned" (half
    of the heads start peaked on the aligned neighbour token; ``retro_model.model.aligned_prior``)."""
    copy_init: float = COPY_INIT_STRENGTH
    """Copy path the aligned-prior heads of the decoder's chunked cross-attention start with
    (``retro_model.model.Retro.init_copy_path``): their value and output projections map a neighbour
    token's encoding onto its own token embedding, scaled by this strength, so reading the aligned
    neighbour token raises that token's logit from step 0. 0 = plain random init. Only heads that
    ``cross_position_init="aligned"`` peaks (``cross_positions="relative"``) get it."""
    neighbor_alignment: str = "match"
    """Where each neighbour's 2m-token window starts in its document (one of
    ``ALIGNMENTS``): "none" = the retrieved chunk + its continuation (the paper);
    "match" = where the document's tokens line up with the query chunk (``align_windows``), so a
    near-duplicate at any offset, or a prompt that starts mid-document, has its continuation aligned
    with the next chunk. Read by whatever supplies the neighbours (the platform's pool, the copy tasks);
    checkpoints written before this field existed used "none"."""
    dropout: float = 0.0
    """Dropout probability in attention outputs and feed-forward blocks."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    max_seq_len: int = 2048
    """Longest sequence (tokens) the rotary tables are built for."""
    pad_id: int = 0
    """Token id used for padding in tokens, targets and neighbours."""
    retrieval: bool = True
    """False builds the decoder-only baseline: same decoder, no encoder and no cross-attention."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    loss_chunk_tokens: int = 512
    """Rows of logits the loss materialises at once when the logits are not returned (memory only)."""

    def __post_init__(self) -> None:
        if self.cca_layers is not None:
            self.cca_layers = tuple(int(x) for x in self.cca_layers)
        positive = [
            "vocab_size",
            "d_model",
            "n_heads",
            "n_layers",
            "chunk_len",
            "enc_layers",
            "num_neighbors",
            "max_seq_len",
            "loss_chunk_tokens",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RetroConfig.{name} must be a positive integer, got {value!r}")
        for name in ["d_ff", "enc_d_model", "enc_n_heads", "enc_d_ff", "neighbor_len"]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"RetroConfig.{name} must be a positive integer or None, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"RetroConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "into an even head size (rotary embeddings rotate pairs)"
            )
        if self.enc_width % self.enc_heads:
            raise ValueError(
                f"RetroConfig.enc_d_model ({self.enc_width}) must be divisible by enc_n_heads ({self.enc_heads})"
            )
        if (self.enc_width // self.enc_heads) % 2:
            raise ValueError("RetroConfig.enc_d_model / enc_n_heads must be even (rotary embeddings)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"RetroConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.cross_positions not in CROSS_POSITIONS:
            raise ValueError(
                f"RetroConfig.cross_positions must be one of {list(CROSS_POSITIONS)}, got {self.cross_positions!r}"
            )
        if self.cross_position_init not in ("zero", "aligned"):
            raise ValueError(
                f'RetroConfig.cross_position_init must be "zero" or "aligned", got {self.cross_position_init!r}'
            )
        if self.cross_positions == "rotary" and (self.n_heads < 2 or self.enc_heads < 2):
            raise ValueError(
                'RetroConfig.cross_positions="rotary" puts rotary positions on half of the heads: '
                "n_heads and enc_n_heads must be >= 2"
            )
        if self.neighbor_alignment not in ALIGNMENTS:
            raise ValueError(
                f"RetroConfig.neighbor_alignment must be one of {list(ALIGNMENTS)}, got {self.neighbor_alignment!r}"
            )
        if not (isinstance(self.copy_init, (int, float)) and 0.0 <= self.copy_init < float("inf")):
            raise ValueError(f"RetroConfig.copy_init must be a finite number >= 0, got {self.copy_init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RetroConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"RetroConfig.pad_id ({self.pad_id}) must be in [0, vocab_size={self.vocab_size})"
            )
        if self.max_seq_len < self.chunk_len:
            raise ValueError(
                f"RetroConfig.max_seq_len ({self.max_seq_len}) must be >= chunk_len ({self.chunk_len})"
            )
        if self.cca_layers is not None:
            bad = [i for i in self.cca_layers if not 1 <= i <= self.n_layers]
            if bad:
                raise ValueError(
                    f"RetroConfig.cca_layers {bad} out of range: layers are numbered 1..n_layers={self.n_layers}"
                )
            if len(set(self.cca_layers)) != len(self.cca_layers):
                raise ValueError(f"RetroConfig.cca_layers has duplicates: {self.cca_layers}")
            if self.retrieval and not self.cca_layers:
                raise ValueError(
                    "RetroConfig.cca_layers is empty but retrieval=True: name at least one layer"
                )

    # Derived values (never stored separately, so they cannot disagree with the fields).
    @property
    def ff_width(self) -> int:
        """Decoder feed-forward width."""
        return self.d_ff or 4 * self.d_model

    @property
    def enc_width(self) -> int:
        """Neighbour-encoder width d'."""
        return self.enc_d_model or self.d_model

    @property
    def enc_heads(self) -> int:
        """Neighbour-encoder attention heads."""
        return self.enc_n_heads or self.n_heads

    @property
    def enc_ff_width(self) -> int:
        """Neighbour-encoder feed-forward width."""
        return self.enc_d_ff or 4 * self.enc_width

    @property
    def retrieved_len(self) -> int:
        """Tokens per neighbour r."""
        return self.neighbor_len or 2 * self.chunk_len

    @property
    def resolved_cca_layers(self) -> tuple[int, ...]:
        """1-based decoder layers carrying chunked cross-attention (empty for the baseline)."""
        if not self.retrieval:
            return ()
        return self.cca_layers if self.cca_layers is not None else paper_cca_layers(self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML-safe) that ``RetroConfig(**d)`` rebuilds exactly."""
        out = dataclasses.asdict(self)
        if out["cca_layers"] is not None:
            out["cca_layers"] = list(out["cca_layers"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RetroConfig:
        """Build from a dict, naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown RetroConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RetroConfig:
        """A named size preset (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown RetroConfig preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on CPU: what the tests use.
    "debug": dict(d_model=64, n_heads=2, n_layers=2, enc_layers=1, d_ff=128, max_seq_len=512),
    # ~9M parameters at vocab 8192: the benchmark config, trains at ~2k tokens/s on 2 CPU cores.
    "small": dict(d_model=256, n_heads=4, n_layers=6, enc_layers=2, d_ff=1024, max_seq_len=2048),
    # GPT-2 small class (~125M with vocab 32k): single GPU.
    "125m": dict(
        vocab_size=32000,
        d_model=768,
        n_heads=12,
        n_layers=12,
        enc_layers=2,
        enc_d_model=768,
        max_seq_len=2048,
    ),
    # GPT-2 medium class (~350M with vocab 32k): multi-GPU DDP.
    "350m": dict(
        vocab_size=32000,
        d_model=1024,
        n_heads=16,
        n_layers=24,
        enc_layers=2,
        enc_d_model=896,
        enc_n_heads=14,
        max_seq_len=2048,
    ),
}
