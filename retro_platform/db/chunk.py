"""Documents -> fixed-length token chunks that never cross a document; the Parquet chunk store.

Each document is tokenized, ``<eod>`` appended, and cut into ``chunk_len``-token chunks; the last chunk
of a document is padded with ``<pad>`` and ``n_tokens`` says how many tokens are real. Chunk and
document ids are global and contiguous (see ``retro_platform.db.layout``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from retro_platform.db.tokenizer import eod_id, pad_id

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.int64()),
        ("doc_id", pa.int64()),
        ("doc_key", pa.string()),
        ("position", pa.int32()),
        ("tokens", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("text", pa.string()),
    ]
)
"""Columns of the chunk store."""


def document_token_ids(texts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each text, with ``<eod>`` appended when the tokenizer has it."""
    eod = eod_id(tokenizer)
    encoded = tokenizer.encode_batch_fast(texts) if hasattr(tokenizer, "encode_batch_fast") else None
    if encoded is None:
        encoded = tokenizer.encode_batch(texts)
    return [e.ids + ([eod] if eod is not None else []) for e in encoded]


def count_chunks(texts: list[str], tokenizer: Tokenizer, chunk_len: int) -> list[int]:
    """Number of chunks each document yields."""
    return [max(1, -(-len(ids) // chunk_len)) for ids in document_token_ids(texts, tokenizer)]


def chunk_documents(
    docs: list[dict[str, str]],
    tokenizer: Tokenizer,
    chunk_len: int,
    first_doc_id: int,
    first_chunk_id: int,
) -> pa.Table:
    """Cut documents into chunks -> a chunk-store table (ids continue from the given firsts)."""
    pad = pad_id(tokenizer)
    columns: dict[str, list] = {name: [] for name in CHUNK_SCHEMA.names}
    chunk_id = first_chunk_id
    for offset, (doc, ids) in enumerate(
        zip(docs, document_token_ids([d["text"] for d in docs], tokenizer), strict=True)
    ):
        for position, start in enumerate(range(0, max(len(ids), 1), chunk_len)):
            piece = ids[start : start + chunk_len]
            columns["chunk_id"].append(chunk_id)
            columns["doc_id"].append(first_doc_id + offset)
            columns["doc_key"].append(doc["id"])
            columns["position"].append(position)
            columns["tokens"].append(piece + [pad] * (chunk_len - len(piece)))
            columns["n_tokens"].append(len(piece))
            columns["text"].append(tokenizer.decode(piece))
            chunk_id += 1
    return pa.Table.from_pydict(columns, schema=CHUNK_SCHEMA)


def read_chunks(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a chunk-store shard (local path or ``s3://`` URI)."""
    from retro_platform.db.files import read_table

    return read_table(path, columns)


def tokens_array(table: pa.Table, chunk_len: int) -> np.ndarray:
    """The ``tokens`` column as an int32 array [n_chunks, chunk_len]."""
    flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.int32).reshape(-1, chunk_len)
