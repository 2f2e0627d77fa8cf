"""Reading and writing database files at any location (local/NFS path or ``s3://`` URI), safely.

Every write is atomic (``retro_platform.storage``): locally a temporary file next to its target renamed
over it when complete, on S3 one upload that becomes visible only when complete; so a crash never
leaves a partial file under a real name (a restarted build removes local leftovers). Writers return the
sha256 of what they wrote, which the manifest records. Readers that need a real local file
(``np.load(mmap_mode="r")``, ``faiss.read_index``) get the file itself locally and a node-local cached
copy of a remote one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retro_platform import node_cache, storage
from retro_platform.storage import TEMP_PREFIX


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary of an interrupted write (``.<name>.<pid>.tmp`` or storage's)."""
    return name.startswith(TEMP_PREFIX) or (name.startswith(".") and name.endswith(".tmp"))


def write_table_atomic(table: pa.Table, location: str | Path, row_group_size: int | None = None) -> str:
    """Write Parquet (zstd) atomically -> its sha256; ``row_group_size`` fixes the rows per row group
    (the build embeds one row group per encode call)."""
    stat = storage.write_file_atomic(
        location,
        lambda f: pq.write_table(table, f, compression="zstd", row_group_size=row_group_size),
        checksum=True,
    )
    return stat.sha256


def save_npy_atomic(array: np.ndarray, location: str | Path) -> str:
    """np.save atomically -> its sha256."""
    return storage.write_file_atomic(location, lambda f: np.save(f, array), checksum=True).sha256


def write_index_atomic(index: faiss.Index, location: str | Path) -> str:
    """faiss.write_index atomically -> its sha256."""
    return storage.write_path_atomic(
        location, lambda tmp: faiss.write_index(index, str(tmp)), checksum=True
    ).sha256


def write_json_atomic(values: Any, location: str | Path) -> str:
    """JSON (indented, sorted keys) atomically -> its sha256."""
    data = json.dumps(values, indent=2, sort_keys=True).encode()
    return storage.write_bytes_atomic(location, data, checksum=True).sha256


def copy_file(source: str | Path, location: str | Path) -> str:
    """Copy a file (any location) to ``location`` atomically -> its sha256."""
    return storage.write_bytes_atomic(location, storage.read_bytes(source), checksum=True).sha256


def file_sha256(location: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    return storage.sha256(location)


def read_table(location: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file (or some of its columns)."""
    fs, path = storage.filesystem(location)
    return pq.read_table(path, columns=columns, filesystem=fs)


def parquet_file(location: str | Path) -> pq.ParquetFile:
    """A Parquet file opened for reading by row group."""
    return pq.ParquetFile(storage.open_input(location))


def load_npy(location: str | Path, mmap: bool = True) -> np.ndarray:
    """An .npy array, memory-mapped from the file (a node-local copy of a remote one) when ``mmap``."""
    path = storage.local_copy(location)
    array = np.load(path, mmap_mode="r" if mmap else None)
    if mmap:
        node_cache.hold(path, array)  # the cache's size bound keeps the file while it is mapped
    return array


def read_index(location: str | Path, flags: int = 0) -> faiss.Index:
    """A FAISS index from a file (a node-local copy of a remote one)."""
    path = storage.local_copy(location)
    index = faiss.read_index(str(path), flags)
    if flags & faiss.IO_FLAG_MMAP_IFC or flags & faiss.IO_FLAG_MMAP == faiss.IO_FLAG_MMAP:
        node_cache.hold(path, index)  # the cache's size bound keeps the file while it is mapped
    return index
