"""The node-local cache: one folder per node for everything read from object storage or derived from it.

Each entry is a folder named by a key (what it holds: an object's URI, a checkpoint directory, the arrays
made from a chunk store) and a version (a digest of the source's size, ETag and mtime): a changed source
gets a new folder, and the folders of other versions are removed. An entry appears whole or not at all
(filled in a temp folder renamed into place) and is filled once per node: processes wait on a file lock
while one of them fills it.

The cache is bounded: after each fill, entries are removed least recently used first until the cache
holds at most ``RETRO_CACHE_MAX_GB`` (default 100). Removal never breaks a reader:

* an entry a process holds (:func:`hold`, e.g. for the lifetime of a memory map of one of its files)
  holds a shared lock that removal must take exclusively, so it is skipped;
* an entry used in the last ``IN_USE_GRACE_S`` seconds is skipped (a reader between getting a path
  and opening it);
* a removed entry is renamed away before it is deleted, and deleting a file that is open or mapped
  leaves the open file and the mapping intact (POSIX keeps the data until the last user lets go).

``RETRO_CACHE_DIR`` chooses the folder (default ``~/.cache/retro-platform/storage``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from retro_platform.errors import StorageError

logger = logging.getLogger(__name__)

CACHE_ENV = "RETRO_CACHE_DIR"
"""Variable naming the cache folder."""
MAX_GB_ENV = "RETRO_CACHE_MAX_GB"
"""Variable bounding the cache's size (GB, decimal: 10**9 bytes)."""
DEFAULT_CACHE_DIR = "~/.cache/retro-platform/storage"
DEFAULT_MAX_GB = 100.0
IN_USE_GRACE_S = 5.0
"""Entries used this recently are never removed to make room."""
LOCK = ".lock"
"""File in every entry folder: shared-locked by its holders, touched on every use (its mtime orders LRU)."""
ENTRIES = "objects"
TEMP_PREFIX = ".retro-tmp-"


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """The cache folder: ``cache_dir``, else ``$RETRO_CACHE_DIR``, else ``~/.cache/retro-platform/storage``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def max_bytes() -> int:
    """The size bound in bytes from ``RETRO_CACHE_MAX_GB`` (StorageError naming the variable when it is
    not a positive number)."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise StorageError(
            f"{MAX_GB_ENV}={raw!r} is not a size: set it to the node-local cache's bound in GB, a number "
            f"above 0 (e.g. 50 or 0.5), or unset it for {DEFAULT_MAX_GB:g}"
        )
    return int(value * 1e9)


def temp_folder(cache_dir: str | os.PathLike | None = None) -> str:
    """A node-local folder for spooled writes (created)."""
    folder = os.path.join(cache_root(cache_dir), "tmp")
    os.makedirs(folder, exist_ok=True)
    return folder


def version_of(*parts: object) -> str:
    """A short digest naming one version of a source (its size, ETag, mtime...)."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def entry(
    key: str,
    version: str,
    fill: Callable[[str], None],
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The folder of entry ``key`` at ``version``, filled once per node by ``fill(folder)`` (which writes
    the entry's files into the empty temp folder it is given). Other versions of the key are removed,
    then the cache is trimmed to its bound (:func:`trim`)."""
    bound = max_bytes()  # a bad setting fails before anything is downloaded
    digest = hashlib.sha256(key.encode()).hexdigest()
    key_dir = os.path.join(cache_root(cache_dir), ENTRIES, digest[:2], digest)
    folder = os.path.join(key_dir, version)
    if _touch(folder):
        return Path(folder)
    os.makedirs(key_dir, exist_ok=True)
    with _exclusive(os.path.join(key_dir, LOCK)):
        if not _touch(folder):
            tmp = os.path.join(key_dir, TEMP_PREFIX + uuid.uuid4().hex[:12])
            os.makedirs(tmp)
            try:
                fill(tmp)
                Path(tmp, LOCK).touch()
                os.rename(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for name in os.listdir(key_dir):
            if name not in (version, LOCK):
                _remove(os.path.join(key_dir, name), grace_s=0.0)  # stale versions, unless held
    trim(bound, keep=folder, cache_dir=cache_dir)
    return Path(folder)


def _touch(folder: str) -> bool:
    """Mark a complete entry used now -> whether it exists."""
    try:
        os.utime(os.path.join(folder, LOCK))
        return True
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class Entry:
    """One entry of the cache."""

    folder: str
    size: int
    """Bytes of its files."""
    used: float
    """When it was last used (epoch seconds)."""


def entries(cache_dir: str | os.PathLike | None = None) -> list[Entry]:
    """Every complete entry, least recently used first."""
    root = os.path.join(cache_root(cache_dir), ENTRIES)
    found = []
    for lock in Path(root).glob(f"*/*/*/{LOCK}"):
        folder = lock.parent
        if folder.name.startswith(TEMP_PREFIX):
            continue
        with contextlib.suppress(FileNotFoundError):
            used = lock.stat().st_mtime
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            found.append(Entry(str(folder), size, used))
    return sorted(found, key=lambda e: e.used)


def trim(
    bound: int | None = None, keep: str | None = None, cache_dir: str | os.PathLike | None = None
) -> int:
    """Remove least recently used entries until the cache holds at most ``bound`` bytes (default: the
    configured bound), never ``keep``, a held entry or one used in the last ``IN_USE_GRACE_S`` s -> the
    bytes still held above the bound (0 when it fits)."""
    bound = max_bytes() if bound is None else bound
    found = entries(cache_dir)
    total = sum(e.size for e in found)
    for item in found:
        if total <= bound:
            break
        if item.folder != keep and _remove(item.folder, grace_s=IN_USE_GRACE_S):
            total -= item.size
    if total > bound:
        logger.warning(
            "the node-local cache %s holds %.3g GB, above %s=%.3g: what is left is in use; raise the bound",
            cache_root(cache_dir),
            total / 1e9,
            MAX_GB_ENV,
            bound / 1e9,
        )
    return max(0, total - bound)


def _remove(folder: str, grace_s: float) -> bool:
    """Remove an entry folder unless it is held or was used within ``grace_s`` -> whether it was."""
    lock = os.path.join(folder, LOCK)
    try:
        handle = open(lock, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:  # a temp folder of a fill that died, or gone already
        shutil.rmtree(folder, ignore_errors=True)
        return True
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if time.time() - os.fstat(handle.fileno()).st_mtime < grace_s:
            return False
        trash = os.path.join(os.path.dirname(folder), TEMP_PREFIX + "gone-" + uuid.uuid4().hex[:12])
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return True
    shutil.rmtree(trash, ignore_errors=True)
    return True


class Hold:
    """A shared lock on a cache entry: the entry is not removed while it is held."""

    def __init__(self, folder: str):
        self.folder = folder
        self._handle = None
        while True:
            handle = open(os.path.join(folder, LOCK), "rb")  # noqa: SIM115 (kept open while held)
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(os.path.join(folder, LOCK)))
            except FileNotFoundError:
                same = False
            if same:
                self._handle = handle
                return
            handle.close()  # removed while we waited: the caller's path is gone
            raise FileNotFoundError(f"{folder} was removed from the node-local cache")

    def release(self) -> None:
        """Let the entry be removed again."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def entry_of(path: str | os.PathLike) -> str | None:
    """The entry folder holding ``path`` (a file inside the cache), or None for a path outside it."""
    root = os.path.join(cache_root(), ENTRIES)
    relative = os.path.relpath(os.path.abspath(os.fspath(path)), root).split(os.sep)
    if relative[0] == ".." or len(relative) < 4:  # <kk>/<key digest>/<version>/<file...>
        return None
    return os.path.join(root, *relative[:3])


def hold(path: str | os.PathLike, owner: object | None = None) -> Hold | None:
    """Keep the cache entry holding ``path`` from being removed: until ``owner`` (e.g. the memory-mapped
    array or index read from it) is garbage collected, or until ``release()`` when there is no owner.
    None for a path outside the cache (a local file needs no hold)."""
    folder = entry_of(path)
    if folder is None:
        return None
    held = Hold(folder)
    if owner is not None:
        weakref.finalize(owner, held.release)
    return held
