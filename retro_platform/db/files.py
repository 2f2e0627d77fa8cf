"""Writing database files safely: every write goes to a temporary file next to its target and is renamed
over it when complete, so a crash never leaves a partial file under a real name (a restarted build removes
the ``.<name>.<pid>.tmp`` leftovers); and the checksum that records what was written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to: renamed over ``path`` when the block ends without
    error, removed when it raises. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table_atomic(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    """Write Parquet (zstd) atomically; ``row_group_size`` fixes the rows per row group (the build embeds
    one row group per task)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """np.save atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    """faiss.write_index atomically."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def write_json_atomic(values: Any, path: Path) -> None:
    """JSON (indented, sorted keys) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2, sort_keys=True))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
