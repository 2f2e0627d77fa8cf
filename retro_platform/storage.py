"""Storage locations: a local/NFS path or ``s3://bucket/prefix``, read and written through ``pyarrow.fs``.

Every location is a string: a plain path (``file:///x`` means ``/x``) or an ``s3://`` URI, for AWS or any
S3-compatible server (MinIO, Ceph, moto...). ``pyarrow.fs.FileSystem.from_uri`` finds the endpoint
(``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``) and the bucket's region (``AWS_REGION`` wins when
set); credentials come from the AWS SDK's default chain (an instance role on a cluster; locally
``AWS_PROFILE`` or the key variables) and are never put into the filesystem objects. Every request is
retried ``RETRO_S3_MAX_ATTEMPTS`` times (default 6, AWS's standard retry strategy: exponential backoff),
so a short outage of the server is ridden out. Buckets are never created.

Writes are atomic (:func:`write_path_atomic`, which every writer goes through): the data is produced
into a node-local temp file (locally: beside the target), then renamed over the target, or uploaded in
one piece that S3 makes visible only when complete. If the producer fails, nothing is published.

Readers that need a real local file (``faiss.read_index``, ``np.load(mmap_mode="r")``) call
:func:`local_copy`: the path itself for a local location, else a copy in the node-local cache
(:mod:`retro_platform.node_cache`, versioned by the object's size, ETag and mtime, bounded in size).

Errors are :class:`~retro_platform.errors.StorageError` saying what to change (credentials, bucket,
endpoint, permission) or :class:`~retro_platform.errors.StorageNotFoundError` for a missing file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import posixpath
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from retro_platform import node_cache
from retro_platform.errors import StorageError, StorageNotFoundError
from retro_platform.node_cache import CACHE_ENV as CACHE_ENV  # re-exported: callers name them here
from retro_platform.node_cache import TEMP_PREFIX as TEMP_PREFIX
from retro_platform.node_cache import cache_root as cache_root

BLOCK_SIZE = 1024 * 1024
MAX_ATTEMPTS_ENV = "RETRO_S3_MAX_ATTEMPTS"
"""Variable setting how many times one S3 request is tried."""
DEFAULT_MAX_ATTEMPTS = 6
# The variables a process (driver or Ray worker) needs to reach S3 the same way as this one.
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "MLFLOW_S3_ENDPOINT_URL",
    MAX_ATTEMPTS_ENV,
    node_cache.MAX_GB_ENV,
)


@dataclass(frozen=True)
class FileStat:
    """What identifies one version of a file: its size, modification time and (S3) ETag.

    ``mtime_ns`` is the local file's mtime, or the object's Last-Modified on S3 (whole seconds there, so
    compare ``etag`` too to notice a rewrite within one second). ``sha256`` is filled by the writes asked
    for ``checksum=True``, and by whoever records a checksum with the stat (a database manifest's
    ``file_stats``, which stores an unknown mtime as 0)."""

    size: int
    """Bytes."""
    mtime_ns: int | None
    """Modification time (ns since the epoch); None when storage does not say."""
    etag: str | None = None
    """The object's ETag on S3; None for local files."""
    sha256: str | None = None
    """The file's checksum, when it was taken or recorded with this stat."""

    def same_version(self, other: FileStat) -> bool:
        """Whether ``other`` describes the same version (size, mtime and ETag; sha256 is ignored). An
        unknown mtime (None) counts as 0, as records that need an integer store it."""
        return (self.size, self.mtime_ns or 0, self.etag) == (other.size, other.mtime_ns or 0, other.etag)


# ---------------------------------------------------------------------------------------------------
# Locations


def _scheme(location: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", location)
    return match.group(1).lower() if match else ""


def _text(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    if not isinstance(text, str):
        raise TypeError(f"a storage location is a str or a path, not {type(location).__name__}")
    if not text:
        raise StorageError("empty storage location: give a local path or s3://bucket/prefix")
    return text


def is_remote(location: str | os.PathLike) -> bool:
    """True for an ``s3://`` URI, False for a local path (or ``file://`` URI); StorageError for another
    scheme."""
    text = _text(location)
    scheme = _scheme(text)
    if scheme == "s3":
        return True
    if scheme in ("", "file"):
        return False
    raise StorageError(
        f"unsupported storage location {text!r}: use a local/NFS path or s3://bucket/prefix "
        f"(any S3-compatible server through AWS_ENDPOINT_URL)"
    )


def _local_path(location: str | os.PathLike) -> str:
    text = _text(location)
    if _scheme(text) == "file":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: a file:// URI must name a local path (file:///path)")
        text = parsed.path
    return os.path.abspath(os.path.expanduser(text))


def _bucket(location: str) -> str:
    bucket = location.split("://", 1)[1].partition("/")[0]
    if not bucket:
        raise StorageError(f"{location!r} names no bucket: write s3://bucket/prefix")
    return bucket


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base`` with relative ``parts`` appended (``/`` between them on S3, never collapsing ``s3://``).

    A part may hold several segments (``"index/shard-0.faiss"``); an absolute part or a URI is a
    ValueError rather than silently replacing ``base`` as ``os.path.join`` would."""
    base_text = _text(base)
    clean = []
    for part in map(os.fspath, parts):
        if part.startswith("/") or _scheme(part):
            raise ValueError(f"join: {part!r} is not a relative path (base {base_text!r})")
        if part.strip("/"):
            clean.append(part.strip("/"))
    if not clean:
        return base_text
    if is_remote(base_text):
        return base_text.rstrip("/") + "/" + "/".join(clean)
    return os.path.join(base_text, *clean)


def parent(location: str | os.PathLike) -> str:
    """The folder (prefix) holding ``location``, in the same form (``s3://b/a/x`` -> ``s3://b/a``)."""
    text = _text(location).rstrip("/")
    if is_remote(text):
        head = posixpath.dirname(text.split("://", 1)[1])
        return f"{_scheme(text)}://{head or _bucket(text)}"
    return os.path.dirname(text) or text


def basename(location: str | os.PathLike) -> str:
    """The last segment of ``location`` (file or object name)."""
    return posixpath.basename(_text(location).rstrip("/"))


# ---------------------------------------------------------------------------------------------------
# Filesystems

_FS_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_KNOWN_BUCKETS: set[tuple] = set()
_LOCAL_FS = pafs.LocalFileSystem()


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def max_attempts() -> int:
    """Tries per S3 request from ``RETRO_S3_MAX_ATTEMPTS`` (default 6; StorageError when not an integer
    >= 1)."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise StorageError(
            f"{MAX_ATTEMPTS_ENV}={raw!r} is not a number of tries: set it to an integer >= 1 (each S3 "
            f"request is retried with exponential backoff up to that many times), or unset it for "
            f"{DEFAULT_MAX_ATTEMPTS}"
        )
    return int(raw)


def check_settings() -> None:
    """Refuse a bad ``RETRO_S3_MAX_ATTEMPTS`` or ``RETRO_CACHE_MAX_GB`` (StorageError naming it), before
    any work starts."""
    max_attempts()
    node_cache.max_bytes()


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """An S3FileSystem for ``bucket`` as ``FileSystem.from_uri`` configures it (endpoint, region), with
    the configured retries and no bucket creation; cached per bucket and setting in this process."""
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
            raise StorageError(
                f"AWS_ENDPOINT_URL(_S3)={endpoint!r} is not an endpoint URL: set it to "
                f"http(s)://host[:port] of the S3-compatible server, without a path"
            )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    attempts = max_attempts()
    credentials = hashlib.sha256(
        "\0".join(os.environ.get(name, "") for name in AWS_ENV_VARS[:4]).encode()
    ).hexdigest()
    key = (bucket, endpoint, region, attempts, credentials)
    with _FS_LOCK:
        if key in _FILESYSTEMS:
            return _FILESYSTEMS[key]
    try:
        found, _ = pafs.FileSystem.from_uri(f"s3://{bucket}" + (f"?region={region}" if region else ""))
    except OSError as exc:
        raise StorageError(
            f"cannot find the region of S3 bucket {bucket!r} ({exc}): set AWS_REGION to the bucket's "
            f"region, or AWS_ENDPOINT_URL for an S3-compatible server"
        ) from exc
    options = found.__reduce__()[1][0]  # from_uri's settings, as S3FileSystem's keyword arguments
    options.update(
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
    )
    fs = pafs.S3FileSystem(**options)
    with _FS_LOCK:
        return _FILESYSTEMS.setdefault(key, fs)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path in it)`` for ``location``: ``LocalFileSystem`` and the absolute path,
    or for ``s3://bucket/key`` an ``S3FileSystem`` (see the module docstring) and ``"bucket/key"``."""
    text = _text(location)
    if not is_remote(text):
        return _LOCAL_FS, _local_path(text)
    return _s3_filesystem(_bucket(text)), text.split("://", 1)[1].strip("/")


def ray_filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` to hand to Ray: ``ray.data.read_parquet(path, filesystem=fs)``,
    ``Dataset.write_parquet(path, filesystem=fs)``, ``RunConfig(storage_path=path,
    storage_filesystem=fs)``. The filesystem travels with its endpoint, region and retries but without
    credentials: every node finds its own (an instance role, or :func:`aws_env_vars`)."""
    return filesystem(location)


def aws_env_vars() -> dict[str, str]:
    """The storage variables of this process (AWS credentials, region, endpoints, MLFLOW_S3_ENDPOINT_URL,
    S3 retries, the node cache's bound) that a Ray worker needs to use storage as the driver does: merge
    them into the runtime env's env_vars. On a cluster whose nodes have an instance role none of the key variables is set,
    so none is passed."""
    return {name: os.environ[name] for name in AWS_ENV_VARS if os.environ.get(name)}


# ---------------------------------------------------------------------------------------------------
# Errors

_REFUSED = re.compile(
    r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|EXPIRED_TOKEN|AccessDenied|"
    r"InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|credentials|HTTP status 403"
)


def _where() -> str:
    endpoint = _endpoint()
    return f"the S3 endpoint {endpoint}" if endpoint else "AWS S3"


def _s3_error(location: str, action: str, exc: OSError) -> StorageError:
    """A StorageError saying what to change for an S3 failure of pyarrow."""
    bucket, message = _bucket(location), str(exc)
    if "NO_SUCH_BUCKET" in message or "NoSuchBucket" in message:
        return _missing_bucket(location)
    if _REFUSED.search(message):
        hint = (
            ""
            if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
            else " (neither AWS_ACCESS_KEY_ID nor AWS_PROFILE is set in this process)"
        )
        return StorageError(
            f"{_where()} refused to {action} {location}{hint}: give this node credentials allowed to "
            f"read and write bucket {bucket!r}: an instance role (cluster.yaml), AWS_PROFILE, or "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY ({message})"
        )
    if "NETWORK_CONNECTION" in message or "curlCode" in message or "Could not resolve" in message:
        change = (
            "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (http(s)://host:port) and that the server is up"
            if _endpoint()
            else "check the network/proxy, or set AWS_ENDPOINT_URL to the URL of an S3-compatible server"
        )
        return StorageError(
            f"cannot reach {_where()} to {action} {location} after {max_attempts()} tries "
            f"({MAX_ATTEMPTS_ENV}): {change} ({message})"
        )
    if "301" in message or "PermanentRedirect" in message or "AuthorizationHeaderMalformed" in message:
        return StorageError(f"bucket {bucket!r} is in another region ({message}): set AWS_REGION to it")
    return StorageError(f"cannot {action} {location} on {_where()}: {message}")


def _missing_bucket(location: str) -> StorageError:
    return StorageError(
        f"S3 bucket {_bucket(location)!r} does not exist on {_where()} (location {location}): create it "
        f"(the platform never creates buckets), fix the location, or point AWS_ENDPOINT_URL at the "
        f"server that has it"
    )


def _check_bucket(location: str) -> None:
    """Raise a StorageError when the bucket of an s3:// location does not exist (checked once per
    bucket and filesystem in this process)."""
    bucket = _bucket(location)
    fs = _s3_filesystem(bucket)
    if (id(fs), bucket) in _KNOWN_BUCKETS:
        return
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise _s3_error(location, "find the bucket of", exc) from exc
    if info.type == pafs.FileType.NotFound:
        raise _missing_bucket(location)
    _KNOWN_BUCKETS.add((id(fs), bucket))


@contextlib.contextmanager
def _translated(location: str, action: str) -> Iterator[None]:
    """Turn the OSErrors of a storage operation into StorageError / StorageNotFoundError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if is_remote(location):
            _check_bucket(location)
        raise _not_found(location, action) from exc
    except OSError as exc:
        if is_remote(location):
            raise _s3_error(location, action, exc) from exc
        if isinstance(exc, PermissionError):
            raise StorageError(
                f"permission denied to {action} {location}: give this user access to it ({exc})"
            ) from exc
        raise StorageError(f"cannot {action} {location}: {exc}") from exc


def _not_found(location: str, action: str) -> StorageNotFoundError:
    return StorageNotFoundError(f"{location} does not exist (cannot {action} it)")


# ---------------------------------------------------------------------------------------------------
# Inspecting


def _info(text: str, action: str = "look up") -> pafs.FileInfo:
    fs, path = filesystem(text)
    with _translated(text, action):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and is_remote(text):
        _check_bucket(text)
    return info


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder (S3: object or non-empty prefix) exists at ``location``; a missing
    bucket is a StorageError, not False."""
    return _info(_text(location)).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a folder (S3: a prefix holding objects, or the bucket itself)."""
    return _info(_text(location)).type == pafs.FileType.Directory


def file_info(location: str | os.PathLike) -> FileStat:
    """Size and modification time (S3: Last-Modified, whole seconds, and the ETag) of the file at
    ``location``; StorageNotFoundError when there is none (a folder is not a file)."""
    text = _text(location)
    if not is_remote(text):
        info = _info(text, "stat")
        if info.type == pafs.FileType.NotFound:
            raise _not_found(text, "stat")
        if info.type != pafs.FileType.File:
            raise StorageError(f"{text} is a folder, not a file")
        return FileStat(size=info.size, mtime_ns=info.mtime_ns)
    fs, path = filesystem(text)
    try:
        with _translated(text, "stat"), fs.open_input_file(path) as handle:  # one HEAD request
            size, headers = handle.size(), handle.metadata()
    except StorageNotFoundError:
        if _info(text).type == pafs.FileType.Directory:
            raise StorageError(f"{text} is a prefix (folder), not an object") from None
        raise
    modified = headers.get("Last-Modified")  # ISO 8601 from Arrow
    mtime_ns = (
        int(datetime.datetime.fromisoformat(modified.decode()).timestamp()) * 10**9 if modified else None
    )
    etag = headers.get("ETag", b"").decode().strip('"') or None
    return FileStat(size=size, mtime_ns=mtime_ns, etag=etag)


def list_stats(location: str | os.PathLike, recursive: bool = True) -> dict[str, FileStat]:
    """The files under the folder (S3: prefix) ``location`` -> their size and mtime (no ETag), by name
    relative to it with ``/`` separators, sorted; folders and temp files are left out. A missing folder
    has no files; a missing bucket is a StorageError."""
    text = _text(location)
    fs, path = filesystem(text)
    base = path.rstrip("/") or "/"
    with _translated(text, "list"):
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
    if not infos and is_remote(text):
        _check_bucket(text)
    prefix = base.rstrip("/") + "/"
    found = {}
    for info in infos:
        name = info.path.removeprefix(prefix)
        if info.type == pafs.FileType.File and not posixpath.basename(name).startswith(TEMP_PREFIX):
            found[name] = FileStat(size=info.size, mtime_ns=info.mtime_ns)
    return dict(sorted(found.items()))


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Sorted names of the files under the folder (S3: prefix) ``location`` (see :func:`list_stats`)."""
    return list(list_stats(location, recursive))


# ---------------------------------------------------------------------------------------------------
# Reading


def open_input(location: str | os.PathLike) -> pa.NativeFile:
    """A seekable binary file for reading ``location`` (a pyarrow NativeFile: ``read``, ``seek``,
    usable by ``pyarrow.parquet`` and ``np.load`` without mmap); close it (``with``)."""
    text = _text(location)
    fs, path = filesystem(text)
    with _translated(text, "open"):
        return fs.open_input_file(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole content of the file at ``location``."""
    text = _text(location)
    fs, path = filesystem(text)
    with _translated(text, "read"), fs.open_input_stream(path) as stream:
        return stream.read()


def _stream_sha256(stream) -> str:
    digest = hashlib.sha256()
    while block := stream.read(BLOCK_SIZE):
        digest.update(block)
    return digest.hexdigest()


def sha256(location: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``location``, streamed in 1 MiB blocks."""
    text = _text(location)
    fs, path = filesystem(text)
    with _translated(text, "read"), fs.open_input_stream(path) as stream:
        return _stream_sha256(stream)


def local_copy(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file with the content of ``location``, for readers that need one (``faiss.read_index``,
    ``np.load(mmap_mode="r")``): a local location as it is (StorageNotFoundError if missing); an S3
    object downloaded once per node and version into the node-local cache (one HEAD request when it is
    there already). Readers that keep the file open or mapped :func:`node_cache.hold` it."""
    text = _text(location)
    if not is_remote(text):
        file_info(text)  # missing, or a folder: a clear error
        return Path(_local_path(text))
    fs, path = filesystem(text)
    name = basename(text) or "object"
    for _ in range(3):
        stat = file_info(text)

        def fill(folder: str, stat: FileStat = stat) -> None:
            with _translated(text, "download"):
                _copy(path, os.path.join(folder, name), fs, _LOCAL_FS)
            if os.path.getsize(os.path.join(folder, name)) != stat.size or not file_info(text).same_version(
                stat
            ):
                raise _Changed

        try:
            version = node_cache.version_of(stat.size, stat.mtime_ns, stat.etag)
            return node_cache.entry(f"object:{text}", version, fill, cache_dir) / name
        except _Changed:
            continue  # the object changed while downloading: fetch the new version
    raise StorageError(
        f"{text} kept changing while it was downloaded (3 tries): retry when its writer is done"
    )


def _copy(source: str, destination: str, source_fs: pafs.FileSystem, destination_fs: pafs.FileSystem) -> None:
    pafs.copy_files(
        source,
        destination,
        source_filesystem=source_fs,
        destination_filesystem=destination_fs,
        chunk_size=8 * BLOCK_SIZE,
    )


class _Changed(Exception):
    """An object changed while it was downloaded."""


def local_folder(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder with the files under ``location`` (e.g. a checkpoint directory): the folder itself
    when local, else one node-local cached copy of the prefix, fetched again when any file changed."""
    text = _text(location)
    if not is_remote(text):
        return Path(_local_path(text))
    listing = list_stats(text)
    if not listing:
        raise _not_found(text, "copy")
    version = node_cache.version_of(*(f"{n}:{s.size}:{s.mtime_ns}" for n, s in listing.items()))
    fs, path = filesystem(text)

    def fill(folder: str) -> None:
        with _translated(text, "download"):
            _copy(path, folder, fs, _LOCAL_FS)

    return node_cache.entry(f"folder:{text}", version, fill, cache_dir)


# ---------------------------------------------------------------------------------------------------
# Writing


def makedirs(location: str | os.PathLike) -> None:
    """Create the folder ``location`` and its parents (local); nothing on S3, where prefixes need no
    creation (writes create their parents anyway)."""
    text = _text(location)
    if not is_remote(text):
        with _translated(text, "create"):
            os.makedirs(_local_path(text), exist_ok=True)


def write_path_atomic(
    location: str | os.PathLike, producer: Callable[[Path], None], checksum: bool = False
) -> FileStat:
    """Publish the file ``producer(path)`` creates at the temp ``path`` it is given as ``location``,
    atomically: readers see the previous version or the complete new one; parents are created.

    Local: a hidden temp file in the target's folder, fsynced and renamed over it. S3: a temp file in
    the node-local cache's spool, uploaded in one piece (visible only when complete). If ``producer``
    raises or creates no file, nothing is published and no temp file is left. Returns the FileStat
    (with the sha256 when ``checksum``)."""
    text = _text(location)
    remote = is_remote(text)
    if remote:
        _check_bucket(text)  # before a long write, not after it
        folder = node_cache.temp_folder()
    else:
        folder = os.path.dirname(_local_path(text))
        with _translated(text, "write"):
            os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{basename(text) or 'object'}")
    try:
        producer(Path(tmp))
        if not os.path.isfile(tmp):
            raise StorageError(f"the writer of {text} created no file at the path it was given")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
            digest = _stream_sha256(handle) if checksum else None
        fs, path = filesystem(text)
        with _translated(text, "write"):
            if remote:  # Arrow's C++ copies while the S3 stream is open: no Python exception can cut it
                _copy(tmp, path, _LOCAL_FS, fs)
            else:
                os.replace(tmp, path)
                fd = os.open(folder, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        return dataclasses.replace(file_info(text), sha256=digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_file_atomic(
    location: str | os.PathLike, writer: Callable[[IO[bytes]], None], checksum: bool = False
) -> FileStat:
    """:func:`write_path_atomic` for serialisers that write into an open binary file: ``writer(file)``
    (``np.save``, ``pyarrow.parquet.write_table``, ``handle.write``...)."""

    def produce(path: Path) -> None:
        with open(path, "wb") as handle:
            writer(handle)

    return write_path_atomic(location, produce, checksum)


def write_bytes_atomic(location: str | os.PathLike, data: bytes, checksum: bool = False) -> FileStat:
    """Write ``data`` as the file at ``location`` atomically (:func:`write_path_atomic`)."""
    return write_file_atomic(location, lambda handle: handle.write(bytes(data)), checksum)


def upload(local_path: str | os.PathLike, location: str | os.PathLike, checksum: bool = False) -> FileStat:
    """Copy the local file ``local_path`` to ``location`` (local or S3) atomically; returns the FileStat."""
    source = _local_path(local_path)
    if not os.path.isfile(source):
        raise _not_found(os.fspath(local_path), "upload")
    return write_path_atomic(location, lambda tmp: shutil.copyfile(source, tmp), checksum)


def copy_tree(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy every file under the folder ``source`` to the folder ``destination`` (any locations; e.g.
    a database into another work dir). Not atomic as a whole: delete ``destination`` after a failure."""
    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    makedirs(destination)
    with _translated(_text(source), "copy"):
        _copy(source_path, destination_path, source_fs, destination_fs)


def delete(location: str | os.PathLike, missing_ok: bool = True) -> None:
    """Delete the file at ``location`` (StorageNotFoundError if missing and not ``missing_ok``)."""
    text = _text(location)
    fs, path = filesystem(text)
    try:
        with _translated(text, "delete"):
            fs.delete_file(path)
    except StorageNotFoundError:
        if not missing_ok:
            raise


def delete_tree(location: str | os.PathLike) -> None:
    """Delete the folder (S3: every object under the prefix) ``location`` and all it holds; nothing
    if it does not exist."""
    text = _text(location)
    fs, path = filesystem(text)
    if is_remote(text) and "/" not in path.strip("/"):
        raise StorageError(f"refusing to delete the whole bucket {text}: name a prefix inside it")
    if not is_remote(text) and os.path.dirname(path) == path:
        raise StorageError(f"refusing to delete the root folder {text}")
    with contextlib.suppress(StorageNotFoundError), _translated(text, "delete"):
        fs.delete_dir(path)
