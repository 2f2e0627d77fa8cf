"""retro_platform.storage on a local path and on a real S3 server (moto_server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from retro_platform import storage
from retro_platform.errors import RetroError, StorageError, StorageNotFoundError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private node-local cache (downloads and S3 write spools) for each test."""
    path = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_ENV, str(path))
    return path


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder to work in: a local path, or a prefix in a fresh bucket of the moto server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def raw_names(location: str) -> list[str]:
    """Every file under ``location`` as the filesystem lists it (temp files included)."""
    fs, path = storage.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def spool_names(cache_dir) -> list[str]:
    spool = cache_dir / "tmp"
    return sorted(os.listdir(spool)) if spool.exists() else []


def test_locations():
    assert storage.is_remote("s3://bucket/a") and storage.is_remote("S3://bucket")
    assert not storage.is_remote("/data/db") and not storage.is_remote("rel/db")
    assert not storage.is_remote("file:///data/db")
    with pytest.raises(StorageError, match="s3://bucket/prefix"):
        storage.is_remote("gs://bucket/a")
    assert storage.join("s3://bucket", "db", "index/a.faiss") == "s3://bucket/db/index/a.faiss"
    assert storage.join("s3://bucket/p/", "x/") == "s3://bucket/p/x"
    assert storage.join("s3://bucket/p") == "s3://bucket/p"
    assert storage.join("/data", "db", "a.npy") == "/data/db/a.npy"
    for bad in ("/etc", "s3://other/x"):
        with pytest.raises(ValueError):
            storage.join("s3://bucket", bad)
    assert storage.parent("s3://bucket/a/b.npy") == "s3://bucket/a"
    assert storage.parent("s3://bucket/b.npy") == "s3://bucket"
    assert storage.parent("/data/db/a.npy") == "/data/db"
    assert storage.basename("s3://bucket/a/b.npy") == "b.npy" == storage.basename("/x/b.npy")
    fs, path = storage.filesystem("file:///tmp/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x"
    fs, path = storage.filesystem("rel/x")
    assert path == os.path.abspath("rel/x")
    assert issubclass(StorageError, RetroError) and issubclass(StorageNotFoundError, FileNotFoundError)


def test_filesystem_endpoint_from_environment(s3_server, s3_bucket, monkeypatch):
    fs, path = storage.filesystem(f"{s3_bucket}/a/b")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket[5:]}/a/b"
    assert storage.filesystem(f"{s3_bucket}/other")[0] is fs  # cached per endpoint/region/credentials
    storage.write_bytes_atomic(f"{s3_bucket}/a/b", b"x")
    # AWS_ENDPOINT_URL alone is enough; AWS_ENDPOINT_URL_S3 wins over it (as in the AWS SDKs and Arrow).
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.read_bytes(f"{s3_bucket}/a/b") == b"x"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert storage.read_bytes(f"{s3_bucket}/a/b") == b"x"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"{s3_server.endpoint}/some/path")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        storage.filesystem(f"{s3_bucket}/a/b")
    env = storage.aws_env_vars()
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_ENDPOINT_URL"] and env["MLFLOW_S3_ENDPOINT_URL"]


def test_round_trip(root):
    location = storage.join(root, "sub", "blob.bin")
    data = os.urandom(2 * storage.BLOCK_SIZE + 123)  # several sha256 blocks
    assert not storage.exists(location)
    stat = storage.write_bytes_atomic(location, data, checksum=True)
    assert stat.size == len(data) and stat.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.exists(location) and storage.exists(storage.join(root, "sub"))
    assert storage.is_dir(storage.join(root, "sub")) and not storage.is_dir(location)
    assert storage.read_bytes(location) == data
    assert storage.sha256(location) == hashlib.sha256(data).hexdigest()
    info = storage.file_info(location)
    assert info.size == len(data) and info.mtime_ns and info.same_version(stat)
    with storage.open_input(location) as handle:
        handle.seek(len(data) - 10)
        assert handle.read() == data[-10:]
    storage.delete(location)
    assert not storage.exists(location)
    storage.delete(location)  # missing_ok
    with pytest.raises(StorageNotFoundError):
        storage.delete(location, missing_ok=False)


def test_write_file_atomic(root, cache_dir):
    location = storage.join(root, "arrays", "a.npy")
    stat = storage.write_file_atomic(location, lambda f: np.save(f, np.arange(10)), checksum=True)
    assert stat.sha256 == storage.sha256(location)

    def failing(handle):
        handle.write(b"partial" * 1000)
        raise RuntimeError("serialiser failed")

    with pytest.raises(RuntimeError, match="serialiser failed"):
        storage.write_file_atomic(location, failing)
    np.testing.assert_array_equal(np.load(storage.local_copy(location)), np.arange(10))  # previous intact
    fresh = storage.join(root, "arrays", "never.npy")
    with pytest.raises(RuntimeError):
        storage.write_file_atomic(fresh, failing)
    assert not storage.exists(fresh)
    # No temp file or object is left: neither beside the file nor in the spool.
    assert raw_names(storage.join(root, "arrays")) == [storage.filesystem(location)[1]]
    assert spool_names(cache_dir) == []


def test_write_path_atomic(root, cache_dir):
    location = storage.join(root, "index.npy")
    storage.write_path_atomic(location, lambda path: np.save(path, np.ones(4)))
    # np.save adds ".npy" to a name without it: the temp name keeps the final name's suffix.
    np.testing.assert_array_equal(np.load(storage.local_copy(location), mmap_mode="r"), np.ones(4))

    def failing(path):
        path.write_bytes(b"half")
        raise ValueError("no")

    with pytest.raises(ValueError):
        storage.write_path_atomic(location, failing)
    with pytest.raises(StorageError, match="created no file"):
        storage.write_path_atomic(location, lambda path: None)
    np.testing.assert_array_equal(np.load(storage.local_copy(location)), np.ones(4))
    assert raw_names(root) == [storage.filesystem(location)[1]]
    assert spool_names(cache_dir) == []


def test_file_info_changes_when_overwritten(root):
    location = storage.join(root, "f")
    first = storage.write_bytes_atomic(location, b"abc")
    assert storage.file_info(location).same_version(first)
    # S3's Last-Modified has whole seconds.
    time.sleep(1.05 if storage.is_remote(root) else 0.02)
    second = storage.write_bytes_atomic(location, b"abcde")
    info = storage.file_info(location)
    assert info.same_version(second) and not info.same_version(first)
    assert (first.size, info.size) == (3, 5)
    assert info.mtime_ns > first.mtime_ns
    if storage.is_remote(root):
        assert first.etag and info.etag and first.etag != info.etag


def test_list_files_and_delete_tree(root):
    for name in ("a", "b/c", "b/d/e"):
        storage.write_bytes_atomic(storage.join(root, name), name.encode())
    assert storage.list_files(root) == ["a", "b/c", "b/d/e"]
    assert storage.list_files(root + "/") == ["a", "b/c", "b/d/e"]
    assert storage.list_files(root, recursive=False) == ["a"]
    assert storage.list_files(storage.join(root, "b")) == ["c", "d/e"]
    assert storage.list_files(storage.join(root, "missing")) == []
    storage.delete_tree(storage.join(root, "b"))
    assert storage.list_files(root) == ["a"]
    storage.delete_tree(storage.join(root, "missing"))


def test_upload(root, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    stat = storage.upload(source, storage.join(root, "up", "x.bin"), checksum=True)
    assert stat.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert storage.read_bytes(storage.join(root, "up", "x.bin")) == b"payload"
    with pytest.raises(StorageNotFoundError):
        storage.upload(tmp_path / "missing", storage.join(root, "y"))


def test_local_copy(root, cache_dir):
    location = storage.join(root, "arr.npy")
    storage.write_file_atomic(location, lambda f: np.save(f, np.arange(5)))
    path = storage.local_copy(location)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), np.arange(5))
    if not storage.is_remote(root):
        assert str(path) == storage.filesystem(location)[1]  # the file itself, no copy
        assert not cache_dir.exists()
        return
    assert str(path).startswith(str(cache_dir))
    first = path.stat()
    again = storage.local_copy(location)
    assert again == path and again.stat().st_ino == first.st_ino  # downloaded once
    # Rewritten with the same size (and maybe within the same second): the ETag tells it changed.
    storage.write_file_atomic(location, lambda f: np.save(f, np.arange(5) + 7))
    changed = storage.local_copy(location)
    assert changed != path
    np.testing.assert_array_equal(np.load(changed), np.arange(5) + 7)
    assert not path.exists()  # the old version was dropped from the cache
    cached = [name for _, _, files in os.walk(cache_dir / "objects") for name in files]
    assert sorted(cached) == [".lock", ".lock", "arr.npy"]  # the key's fill lock, the entry's; no temp file


def test_local_copy_concurrent_downloads_once(s3_bucket, cache_dir, monkeypatch):
    """Processes of one node (here threads, each with its own lock handle) share one download."""
    from concurrent.futures import ThreadPoolExecutor

    location = f"{s3_bucket}/big.bin"
    data = os.urandom(3 * storage.BLOCK_SIZE)
    storage.write_bytes_atomic(location, data)
    downloads = []
    real_copy = pafs.copy_files

    def counting_copy(source, destination, **kwargs):
        if isinstance(kwargs.get("destination_filesystem"), pafs.LocalFileSystem):
            downloads.append(destination)
            time.sleep(0.2)  # keep the others waiting on the lock
        return real_copy(source, destination, **kwargs)

    monkeypatch.setattr(storage.pafs, "copy_files", counting_copy)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: storage.local_copy(location), range(4)))
    assert len(set(paths)) == 1 and len(downloads) == 1
    assert paths[0].read_bytes() == data


def test_ray_train_storage_context(root, tmp_path):
    """Ray Train's storage (RunConfig(storage_path, storage_filesystem)) accepts ray_filesystem's pair."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    fs, path = storage.ray_filesystem(storage.join(root, "train"))
    context = StorageContext(storage_path=path, experiment_dir_name="exp", storage_filesystem=fs)
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "model.pt").write_bytes(b"weights")
    persisted = context.persist_current_checkpoint(Checkpoint.from_directory(str(local)), "checkpoint_0")
    assert "checkpoint_0/model.pt" in storage.list_files(storage.join(root, "train", "exp"))
    restored = persisted.to_directory(str(tmp_path / "restored"))
    assert (tmp_path / "restored" / "model.pt").read_bytes() == b"weights" and restored


def test_parquet_round_trip_through_filesystem(root):
    table = pa.table({"id": list(range(20)), "text": [f"doc {i}" for i in range(20)]})
    fs, path = storage.filesystem(storage.join(root, "t", "part-0.parquet"))
    storage.makedirs(storage.join(root, "t"))  # a local folder must exist for pyarrow; nothing on S3
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    location = storage.join(root, "t", "part-1.parquet")
    storage.write_file_atomic(location, lambda f: pq.write_table(table, f))
    with storage.open_input(location) as handle:
        assert pq.read_table(handle).equals(table)
    assert storage.list_files(storage.join(root, "t")) == ["part-0.parquet", "part-1.parquet"]


def test_ray_data_parquet(root, ray_session):
    import ray

    # The filesystem travels to the tasks with its endpoint but without credentials: the workers need
    # the AWS variables (the session's Ray may predate the s3_server fixture; moto refuses anonymous
    # writes), which the platform passes in its runtime env and this test per operation.
    runtime_env = {"env_vars": storage.aws_env_vars()} if storage.is_remote(root) else None
    fs, path = storage.ray_filesystem(storage.join(root, "ds"))
    ray.data.range(200, override_num_blocks=2).write_parquet(
        path, filesystem=fs, ray_remote_args={"runtime_env": runtime_env} if runtime_env else {}
    )
    assert len(storage.list_files(storage.join(root, "ds"))) >= 1
    ds = ray.data.read_parquet(path, filesystem=fs, runtime_env=runtime_env)
    assert ds.count() == 200 and ds.sum("id") == sum(range(200))
    if not storage.is_remote(root):
        return

    # A worker that uses the storage module itself.
    storage.write_bytes_atomic(storage.join(root, "w.bin"), b"from the driver")

    @ray.remote(num_cpus=0.1, runtime_env=runtime_env)
    def read_remote(location):
        from retro_platform import storage as worker_storage

        return worker_storage.read_bytes(location), os.environ.get("AWS_ENDPOINT_URL_S3")

    data, endpoint = ray.get(read_remote.remote(storage.join(root, "w.bin")), timeout=120)
    assert data == b"from the driver"
    assert endpoint == os.environ.get("AWS_ENDPOINT_URL_S3")


def test_missing_object_errors(root):
    missing = storage.join(root, "nope.bin")
    for call in (
        storage.read_bytes,
        storage.file_info,
        storage.sha256,
        storage.local_copy,
        storage.open_input,
    ):
        with pytest.raises(StorageNotFoundError, match="nope.bin does not exist"):
            call(missing)


def test_missing_bucket_errors(s3_server):
    location = "s3://retro-no-such-bucket/db/manifest.json"
    calls = [
        lambda: storage.read_bytes(location),
        lambda: storage.exists(location),
        lambda: storage.file_info(location),
        lambda: storage.list_files("s3://retro-no-such-bucket/db"),
        lambda: storage.write_bytes_atomic(location, b"x"),
        lambda: storage.write_file_atomic(location, lambda f: f.write(b"x")),
    ]
    for call in calls:
        with pytest.raises(StorageError, match="bucket 'retro-no-such-bucket' does not exist") as info:
            call()
        assert not isinstance(info.value, FileNotFoundError)
        assert s3_server.endpoint in str(info.value) and "create it" in str(info.value)


def _closed_port() -> int:
    from local_head import free_port

    return free_port()


def test_unreachable_endpoint(s3_server, monkeypatch):
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv(
        storage.MAX_ATTEMPTS_ENV, "1"
    )  # the default 6 tries wait ~14 s (tests/test_node_cache.py)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as info:
        storage.read_bytes("s3://bucket/x")
    assert "AWS_ENDPOINT_URL" in str(info.value) and dead in str(info.value)


def test_refused_credentials(s3_server, monkeypatch):
    """A server with moto's IAM checks on refuses an unknown key: the error names the variables."""
    from s3_server import S3Server

    strict = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for name, value in strict.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        for call in (
            lambda: storage.read_bytes("s3://bucket/x"),
            lambda: storage.write_bytes_atomic("s3://bucket/x", b"x"),
            lambda: storage.list_files("s3://bucket/x"),
        ):
            with pytest.raises(StorageError, match="refused") as info:
                call()
            assert "AWS_ACCESS_KEY_ID" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    finally:
        strict.stop()
