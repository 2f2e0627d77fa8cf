"""Storage locations: a local/NFS path or ``s3://bucket/prefix``, read and written through ``pyarrow.fs``.

Every location is a string. A local location is a plain path (``file:///x`` is accepted and means
``/x``); a remote one keeps its scheme (``s3://bucket/key``). Only ``s3://`` is remote; it works with
AWS and with any S3-compatible server (MinIO, Ceph, moto...) configured through the standard variables:

* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), or ``AWS_PROFILE``, or an
  instance role: the AWS SDK's default chain. Credentials are never put into the filesystem objects, so
  a filesystem pickled into a Ray task carries none: every Ray worker needs the same variables (pass
  :func:`aws_env_vars` in the runtime env) or a role of its own.
* ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (``http://host:port`` for a non-AWS server). Arrow's
  ``FileSystem.from_uri`` reads these two itself (in that order) but ``S3FileSystem()`` does not, so
  :func:`filesystem` reads them and passes ``endpoint_override`` and ``scheme``.
* ``AWS_REGION``, else ``AWS_DEFAULT_REGION``; without either, the bucket's region is asked of AWS (or
  ``us-east-1`` for a custom endpoint).

Buckets are never created (``allow_bucket_creation=False``): a missing bucket is an error naming it.

Writes are atomic: a reader sees the previous version or the complete new one, never a part. Locally
the data goes to a hidden temp file in the same folder, is fsynced and ``os.replace``-d. On S3 an object
only becomes visible when its upload completes; as Arrow's output streams *complete* the upload when
closed after an exception (there is no abort in Python), writer callbacks never write into an S3
stream: their output is spooled to a node-local temp file first and uploaded once complete.

Readers that need a real local file (``faiss.read_index``, ``np.load(mmap_mode="r")``) call
:func:`local_copy`: the path itself for a local location, else a node-local cached download keyed by
the URI and the object's size, mtime and ETag.

Errors are :class:`~retro_platform.errors.StorageError` (missing credentials, missing bucket,
unreachable endpoint, permission) or :class:`~retro_platform.errors.StorageNotFoundError` (also a
FileNotFoundError) for a missing file or object.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
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

from retro_platform.errors import StorageError, StorageNotFoundError

__all__ = [
    "FileStat",
    "StorageError",
    "StorageNotFoundError",
    "aws_env_vars",
    "basename",
    "cache_root",
    "delete",
    "delete_tree",
    "exists",
    "file_info",
    "filesystem",
    "is_dir",
    "is_remote",
    "join",
    "list_files",
    "local_copy",
    "makedirs",
    "open_input",
    "parent",
    "ray_filesystem",
    "read_bytes",
    "sha256",
    "upload",
    "write_bytes_atomic",
    "write_file_atomic",
    "write_path_atomic",
]

REMOTE_SCHEMES = ("s3",)
BLOCK_SIZE = 1024 * 1024
CACHE_ENV = "RETRO_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/retro-platform/storage"
# Local temp files (atomic writes, downloads) start with this; list_files never returns them.
TEMP_PREFIX = ".retro-tmp-"
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
    if scheme in REMOTE_SCHEMES:
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


def _split_s3(location: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; the key may be empty (the bucket itself)."""
    rest = location.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{location!r} names no bucket: write s3://bucket/prefix")
    return bucket, key.strip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base`` with relative ``parts`` appended (``/`` between them on S3, never collapsing ``s3://``).

    A part may hold several segments (``"index/shard-0.faiss"``); an absolute part or a URI is a
    ValueError rather than silently replacing ``base`` as ``os.path.join`` would."""
    base_text = _text(base)
    clean = []
    for part in parts:
        part = os.fspath(part)
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
    text = _text(location)
    if is_remote(text):
        bucket, key = _split_s3(text)
        head = posixpath.dirname(key)
        return f"{_scheme(text)}://{bucket}" + (f"/{head}" if head else "")
    return os.path.dirname(text.rstrip("/")) or text


def basename(location: str | os.PathLike) -> str:
    """The last segment of ``location`` (file or object name)."""
    return posixpath.basename(_text(location).rstrip("/"))


# ---------------------------------------------------------------------------------------------------
# Filesystems


@dataclass(frozen=True)
class _S3Settings:
    endpoint: str | None  # as configured (for messages), None for AWS
    endpoint_override: str | None
    scheme: str
    region: str | None
    credentials: str  # a digest of the credential variables: a changed key gets a new filesystem


_FS_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_BUCKET_REGIONS: dict[str, str] = {}
_KNOWN_BUCKETS: set[tuple] = set()
_LOCAL_FS = pafs.LocalFileSystem()


def _s3_settings() -> _S3Settings:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    endpoint_override, scheme = None, "https"
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
            raise StorageError(
                f"AWS_ENDPOINT_URL(_S3)={endpoint!r} is not an endpoint URL: set it to "
                f"http(s)://host[:port] of the S3-compatible server, without a path"
            )
        endpoint_override, scheme = parsed.netloc, parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    digest = hashlib.sha256(
        "\0".join(
            os.environ.get(name, "")
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        ).encode()
    ).hexdigest()
    return _S3Settings(endpoint, endpoint_override, scheme, region, digest)


def _s3_filesystem(bucket: str) -> tuple[pafs.S3FileSystem, _S3Settings]:
    settings = _s3_settings()
    region = settings.region
    if region is None:
        if settings.endpoint_override:
            region = "us-east-1"
        else:
            region = _BUCKET_REGIONS.get(bucket)
            if region is None:
                try:
                    region = pafs.resolve_s3_region(bucket)
                except OSError as exc:
                    raise StorageError(
                        f"cannot find the region of S3 bucket {bucket!r} ({exc}): set AWS_REGION to the "
                        f"bucket's region, or AWS_ENDPOINT_URL for an S3-compatible server"
                    ) from exc
                _BUCKET_REGIONS[bucket] = region
    key = ("s3", settings.endpoint_override, settings.scheme, region, settings.credentials)
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = pafs.S3FileSystem(
                region=region,
                endpoint_override=settings.endpoint_override,
                scheme=settings.scheme,
                allow_bucket_creation=False,
                allow_bucket_deletion=False,
            )
            _FILESYSTEMS[key] = fs
    return fs, settings


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path in it)`` for ``location``.

    Local: ``LocalFileSystem`` and the absolute path. ``s3://bucket/key``: an ``S3FileSystem`` for the
    endpoint/region of the AWS variables (see the module docstring) and ``"bucket/key"``. Filesystems
    are cached per endpoint, region and credentials in this process."""
    text = _text(location)
    if not is_remote(text):
        return _LOCAL_FS, _local_path(text)
    bucket, key = _split_s3(text)
    fs, _ = _s3_filesystem(bucket)
    return fs, f"{bucket}/{key}" if key else bucket


def ray_filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` to hand to Ray: ``ray.data.read_parquet(path, filesystem=fs)``,
    ``Dataset.write_parquet(path, filesystem=fs)``, ``RunConfig(storage_path=path,
    storage_filesystem=fs)``.

    The filesystem is pickled into Ray's tasks with its endpoint and region but without credentials:
    workers need the AWS variables too (:func:`aws_env_vars` in the runtime env) or an instance role."""
    return filesystem(location)


def aws_env_vars() -> dict[str, str]:
    """The AWS variables of this process (credentials, region, endpoints, MLFLOW_S3_ENDPOINT_URL) that a
    Ray worker needs to reach the same S3 as the driver: merge them into the runtime env's env_vars."""
    return {name: os.environ[name] for name in AWS_ENV_VARS if os.environ.get(name)}


# ---------------------------------------------------------------------------------------------------
# Errors

_AWS_CODE = re.compile(r"AWS Error (\w+)")
_CREDENTIAL_CODES = {
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "MISSING_AUTHENTICATION_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "EXPIRED_TOKEN",
    "UNRECOGNIZED_CLIENT",
}
_CREDENTIAL_WORDS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "credentials",
    "HTTP status 403",
)


def _where(settings: _S3Settings) -> str:
    return f"the S3 endpoint {settings.endpoint}" if settings.endpoint else "AWS S3"


def _s3_error(location: str, action: str, exc: OSError) -> StorageError:
    """A StorageError saying what to change for an S3 failure of pyarrow."""
    settings = _s3_settings()
    bucket, _ = _split_s3(location)
    message = str(exc)
    match = _AWS_CODE.search(message)
    code = match.group(1) if match else ""
    if code == "NO_SUCH_BUCKET" or "NoSuchBucket" in message:
        return _missing_bucket(location, bucket, settings)
    if code in _CREDENTIAL_CODES or any(word in message for word in _CREDENTIAL_WORDS):
        hint = (
            ""
            if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
            else " (neither AWS_ACCESS_KEY_ID nor AWS_PROFILE is set in this process)"
        )
        return StorageError(
            f"{_where(settings)} refused to {action} {location} ({code or 'access denied'}){hint}: set "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) to "
            f"credentials allowed to read and write bucket {bucket!r}, in the driver and in the Ray "
            f"workers' runtime env"
        )
    if code == "NETWORK_CONNECTION" or "curlCode" in message or "Could not resolve" in message:
        change = (
            "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (http(s)://host:port) and that the server is up"
            if settings.endpoint
            else "check the network/proxy, or set AWS_ENDPOINT_URL to the URL of an S3-compatible server"
        )
        return StorageError(f"cannot reach {_where(settings)} to {action} {location}: {change} ({message})")
    if "301" in message or "PermanentRedirect" in message or "AuthorizationHeaderMalformed" in message:
        return StorageError(
            f"bucket {bucket!r} is not in region {settings.region or 'us-east-1'} ({message}): set "
            f"AWS_REGION to the bucket's region"
        )
    return StorageError(f"cannot {action} {location} on {_where(settings)}: {message}")


def _missing_bucket(location: str, bucket: str, settings: _S3Settings) -> StorageError:
    return StorageError(
        f"S3 bucket {bucket!r} does not exist on {_where(settings)} (location {location}): create it "
        f"(the platform never creates buckets), fix the location, or point AWS_ENDPOINT_URL at the "
        f"server that has it"
    )


def _check_bucket(location: str) -> None:
    """Raise a StorageError when the bucket of an s3:// location does not exist (checked once per
    bucket and filesystem in this process)."""
    bucket, _ = _split_s3(location)
    fs, settings = _s3_filesystem(bucket)
    key = (id(fs), bucket)
    if key in _KNOWN_BUCKETS:
        return
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise _s3_error(location, "find the bucket of", exc) from exc
    if info.type == pafs.FileType.NotFound:
        raise _missing_bucket(location, bucket, settings)
    _KNOWN_BUCKETS.add(key)


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


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder (S3: object or non-empty prefix) exists at ``location``; a missing
    bucket is a StorageError, not False."""
    text = _text(location)
    if not is_remote(text):
        return os.path.exists(_local_path(text))
    fs, path = filesystem(text)
    with _translated(text, "look up"):
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
    if not found:
        _check_bucket(text)
    return found


def is_dir(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a folder (S3: a prefix holding objects, or the bucket itself)."""
    text = _text(location)
    if not is_remote(text):
        return os.path.isdir(_local_path(text))
    fs, path = filesystem(text)
    with _translated(text, "look up"):
        kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        _check_bucket(text)
    return kind == pafs.FileType.Directory


def _parse_http_date(value: bytes | str | None) -> int | None:
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    for parse in (
        lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00")),
        lambda t: datetime.datetime.strptime(t, "%a, %d %b %Y %H:%M:%S %Z").replace(
            tzinfo=datetime.timezone.utc
        ),
    ):
        try:
            moment = parse(text)
        except ValueError:
            continue
        return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
    return None


def _remote_stat(fs: pafs.FileSystem, path: str) -> FileStat:
    """Size, Last-Modified and ETag of one object, from one HEAD request."""
    with fs.open_input_file(path) as handle:
        size = handle.size()
        metadata = handle.metadata() or {}
    raw = {(k.decode() if isinstance(k, bytes) else k).lower(): v for k, v in metadata.items()}
    etag = raw.get("etag")
    etag = (etag.decode() if isinstance(etag, bytes) else etag or "").strip('"') or None
    mtime_ns = _parse_http_date(raw.get("last-modified"))
    if mtime_ns is None:
        mtime_ns = fs.get_file_info(path).mtime_ns
    return FileStat(size=size, mtime_ns=mtime_ns, etag=etag)


def file_info(location: str | os.PathLike) -> FileStat:
    """Size and modification time (S3: Last-Modified, whole seconds, and the ETag) of the file at
    ``location``; StorageNotFoundError when there is none (a folder is not a file)."""
    text = _text(location)
    if not is_remote(text):
        path = _local_path(text)
        with _translated(text, "stat"):
            st = os.stat(path)
        if not os.path.isfile(path):
            raise StorageError(f"{text} is a folder, not a file")
        return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns)
    fs, path = filesystem(text)
    with _translated(text, "stat"):
        try:
            return _remote_stat(fs, path)
        except FileNotFoundError:
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                raise StorageError(f"{text} is a prefix (folder), not an object") from None
            raise


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Sorted names of the files under the folder (S3: prefix) ``location``, relative to it with ``/``
    separators; folders themselves and this module's temp files are left out. A missing folder has
    no files (``[]``); a missing bucket is a StorageError."""
    text = _text(location)
    fs, path = filesystem(text)
    base = path.rstrip("/")
    if not base and not is_remote(text):
        base = "/"
    with _translated(text, "list"):
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
    if not infos and is_remote(text):
        _check_bucket(text)
    names = []
    prefix = base.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        name = info.path[len(prefix) :] if info.path.startswith(prefix) else info.path
        if posixpath.basename(name).startswith(TEMP_PREFIX):
            continue
        names.append(name)
    return sorted(names)


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


def sha256(location: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``location``, streamed in 1 MiB blocks."""
    text = _text(location)
    fs, path = filesystem(text)
    digest = hashlib.sha256()
    with _translated(text, "read"), fs.open_input_stream(path) as stream:
        while block := stream.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Writing


def makedirs(location: str | os.PathLike) -> None:
    """Create the folder ``location`` and its parents (local); nothing on S3, where prefixes need no
    creation (writes create their parents anyway)."""
    text = _text(location)
    if not is_remote(text):
        with _translated(text, "create"):
            os.makedirs(_local_path(text), exist_ok=True)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"


@contextlib.contextmanager
def _local_temp_beside(path: str) -> Iterator[str]:
    """A temp path in the folder of ``path`` (created), removed unless it was renamed away."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, _temp_name(os.path.basename(path)))
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _publish_local(tmp: str, path: str, checksum: bool) -> FileStat:
    """fsync ``tmp``, hash it if asked, rename it onto ``path`` and fsync the folder."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    digest = _file_sha256(tmp) if checksum else None
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    st = os.stat(path)
    return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest)


def _upload_complete_file(local_file: str, location: str, checksum: bool) -> FileStat:
    """Upload a complete local file as the object ``location``: one upload that becomes visible only
    when complete. The copy runs in Arrow's C++ (no Python code runs while the S3 stream is open, so
    no Python exception can close it half-written)."""
    fs, path = filesystem(location)
    digest = _file_sha256(local_file) if checksum else None
    with _translated(location, "write"):
        pafs.copy_files(
            local_file,
            path,
            source_filesystem=_LOCAL_FS,
            destination_filesystem=fs,
            chunk_size=8 * BLOCK_SIZE,
        )
    with _translated(location, "stat"):
        stat = _remote_stat(fs, path)
    return FileStat(stat.size, stat.mtime_ns, stat.etag, digest)


@contextlib.contextmanager
def _spool_file(location: str) -> Iterator[str]:
    """A node-local temp path (under ``cache_root()/tmp``) for the output of a writer of a remote
    location, removed at the end."""
    folder = os.path.join(cache_root(), "tmp")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, _temp_name(basename(location) or "object"))
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(location: str | os.PathLike, data: bytes, checksum: bool = False) -> FileStat:
    """Write ``data`` as the file at ``location`` atomically (readers see the old or the new content);
    parents are created. Returns the new file's FileStat (with its sha256 when ``checksum``)."""
    text = _text(location)
    data = bytes(data)
    digest = hashlib.sha256(data).hexdigest() if checksum else None
    if not is_remote(text):
        path = _local_path(text)
        with _translated(text, "write"), _local_temp_beside(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(data)
            stat = _publish_local(tmp, path, checksum=False)
        return FileStat(stat.size, stat.mtime_ns, None, digest)
    fs, path = filesystem(text)
    # One write call of the whole buffer then close: the upload is complete or fails as a whole.
    with _translated(text, "write"), fs.open_output_stream(path) as out:
        out.write(data)
    with _translated(text, "stat"):
        stat = _remote_stat(fs, path)
    return FileStat(stat.size, stat.mtime_ns, stat.etag, digest)


def write_file_atomic(
    location: str | os.PathLike, writer: Callable[[IO[bytes]], None], checksum: bool = False
) -> FileStat:
    """Write the file at ``location`` atomically with ``writer(file)``, which writes binary data into
    the (seekable, real) file it is given: ``np.save``, ``pyarrow.parquet.write_table``,
    ``handle.write``...

    If ``writer`` raises, nothing is published: the previous version (if any) stays, and no temp file
    or object is left. Local: a hidden temp file in the same folder, fsynced and renamed. S3: the
    output is spooled to a node-local temp file, then uploaded in one piece. Returns the FileStat."""
    text = _text(location)
    if not is_remote(text):
        path = _local_path(text)
        with _translated(text, "write"), _local_temp_beside(path) as tmp:
            with open(tmp, "wb") as handle:
                writer(handle)
            return _publish_local(tmp, path, checksum)
    _check_bucket(text)  # before a long write, not after it
    with _spool_file(text) as tmp:
        with open(tmp, "wb") as handle:
            writer(handle)
        return _upload_complete_file(tmp, text, checksum)


def write_path_atomic(
    location: str | os.PathLike, producer: Callable[[Path], None], checksum: bool = False
) -> FileStat:
    """Like :func:`write_file_atomic` for serialisers that want a file name
    (``faiss.write_index(index, str(path))``): ``producer(path)`` must create the file at the local
    temp ``path`` it is given, which is then published atomically at ``location``."""
    text = _text(location)
    if not is_remote(text):
        path = _local_path(text)
        with _translated(text, "write"), _local_temp_beside(path) as tmp:
            producer(Path(tmp))
            if not os.path.isfile(tmp):
                raise StorageError(f"the writer of {text} created no file at the path it was given")
            return _publish_local(tmp, path, checksum)
    _check_bucket(text)
    with _spool_file(text) as tmp:
        producer(Path(tmp))
        if not os.path.isfile(tmp):
            raise StorageError(f"the writer of {text} created no file at the path it was given")
        return _upload_complete_file(tmp, text, checksum)


def upload(local_path: str | os.PathLike, location: str | os.PathLike, checksum: bool = False) -> FileStat:
    """Copy the local file ``local_path`` to ``location`` (local or S3) atomically; returns the FileStat."""
    source = _local_path(local_path)
    if not os.path.isfile(source):
        raise _not_found(os.fspath(local_path), "upload")
    text = _text(location)
    if is_remote(text):
        return _upload_complete_file(source, text, checksum)
    path = _local_path(text)
    with _translated(text, "write"), _local_temp_beside(path) as tmp:
        shutil.copyfile(source, tmp)
        return _publish_local(tmp, path, checksum)


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
    try:
        with _translated(text, "delete"):
            fs.delete_dir(path)
    except StorageNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------
# Node-local cache of remote files


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """The node-local cache folder: ``cache_dir``, else ``$RETRO_CACHE_DIR``, else
    ``~/.cache/retro-platform/storage``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (flock) shared by the processes of this node."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def local_copy(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file with the content of ``location``, for readers that need one (``faiss.read_index``,
    ``np.load(mmap_mode="r")``).

    A local location is returned as is (StorageNotFoundError if missing). An S3 object is downloaded
    once per node into :func:`cache_root` under a name made of the URI and the object's size,
    Last-Modified and ETag: a changed object is fetched again (older versions are then removed), an
    unchanged one costs one HEAD request. Downloads go to a temp file renamed into place under a lock,
    so concurrent processes of the node never see a partial file and download it only once."""
    text = _text(location)
    if not is_remote(text):
        path = _local_path(text)
        if not os.path.isfile(path):
            if os.path.isdir(path):
                raise StorageError(f"{text} is a folder, not a file")
            raise _not_found(text, "read")
        return Path(path)
    fs, path = filesystem(text)
    name = basename(text) or "object"
    uri_key = hashlib.sha256(text.encode()).hexdigest()
    object_dir = os.path.join(cache_root(cache_dir), "objects", uri_key[:2], uri_key)
    for _ in range(3):
        stat = file_info(text)
        version = hashlib.sha256(f"{stat.size}:{stat.mtime_ns}:{stat.etag}".encode()).hexdigest()[:16]
        target = os.path.join(object_dir, version, name)
        if _cached(target, stat.size):
            return Path(target)
        os.makedirs(os.path.join(object_dir, version), exist_ok=True)
        with _file_lock(os.path.join(object_dir, ".lock")):
            if _cached(target, stat.size):
                return Path(target)
            tmp = os.path.join(object_dir, version, _temp_name(name))
            try:
                with _translated(text, "download"):
                    pafs.copy_files(
                        path,
                        tmp,
                        source_filesystem=fs,
                        destination_filesystem=_LOCAL_FS,
                        chunk_size=8 * BLOCK_SIZE,
                    )
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                if os.path.getsize(tmp) != stat.size or not file_info(text).same_version(stat):
                    continue  # the object changed while downloading: fetch the new version
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _remove_other_versions(object_dir, keep=version)
        return Path(target)
    raise StorageError(
        f"{text} kept changing while it was downloaded (3 attempts): retry when its writer is done"
    )


def _cached(target: str, size: int) -> bool:
    try:
        return os.path.getsize(target) == size
    except OSError:
        return False


def _remove_other_versions(object_dir: str, keep: str) -> None:
    """Best effort: drop cached versions other than ``keep`` (open files and mmaps of them stay valid)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(object_dir):
            if entry.is_dir(follow_symlinks=False) and entry.name != keep:
                shutil.rmtree(entry.path, ignore_errors=True)
