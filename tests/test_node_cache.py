"""The node-local cache (retro_platform.node_cache) and S3 retries, on a real S3 server (moto_server)."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

from retro_platform import node_cache, storage
from retro_platform.db.files import load_npy
from retro_platform.errors import StorageError

KB = 1000


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private cache; entries used a moment ago may be removed (no grace period)."""
    path = tmp_path / "cache"
    monkeypatch.setenv(node_cache.CACHE_ENV, str(path))
    monkeypatch.setattr(node_cache, "IN_USE_GRACE_S", 0.0)
    return path


def bound(monkeypatch, nbytes: int) -> None:
    monkeypatch.setenv(node_cache.MAX_GB_ENV, str(nbytes / 1e9))


def put(name: str, nbytes: int = 10 * KB) -> str:
    """An entry of one file of ``nbytes`` -> its folder."""

    def fill(folder: str) -> None:
        np.save(os.path.join(folder, "a.npy"), np.full(nbytes // 8, len(name), dtype=np.int64))

    folder = node_cache.entry(f"test:{name}", "v1", fill)
    time.sleep(0.02)  # distinct use times
    return str(folder)


def test_bound_removes_least_recently_used_first(monkeypatch):
    bound(monkeypatch, 35 * KB)  # three 10 kB entries fit, four do not
    a, b, c = put("a"), put("b"), put("c")
    put("a")  # used again: b is now the least recently used
    d = put("d")
    assert [os.path.isdir(f) for f in (a, b, c, d)] == [True, False, True, True]
    assert sum(e.size for e in node_cache.entries()) <= 35 * KB
    put("e")
    assert not os.path.isdir(c) and os.path.isdir(a)  # c was next in line
    assert [os.path.basename(e.folder) for e in node_cache.entries()] == ["v1"] * 3


def test_a_mapped_file_is_never_removed_under_its_reader(monkeypatch):
    bound(monkeypatch, 25 * KB)
    held = put("held")
    array = load_npy(os.path.join(held, "a.npy"))  # memory-mapped, and holds its entry
    assert isinstance(array, np.memmap)
    for name in ("x", "y", "z"):
        put(name)
    assert os.path.isdir(held)  # held: the others went instead
    np.testing.assert_array_equal(array, np.full(10 * KB // 8, 4))
    assert node_cache.trim(0) >= 10 * KB  # asked to empty the cache: the held entry stays
    assert [e.folder for e in node_cache.entries()] == [held]
    del array
    gc.collect()
    assert node_cache.trim(0) == 0 and not os.path.isdir(held)  # the map is gone: the entry may go now


def test_a_stale_version_is_removed_unless_held():
    def fill(value):
        return lambda folder: np.save(os.path.join(folder, "a.npy"), np.full(4, value))

    first = node_cache.entry("test:versions", "v1", fill(1))
    array = load_npy(first / "a.npy")
    second = node_cache.entry("test:versions", "v2", fill(2))
    assert first.is_dir() and second.is_dir()  # v1 is still mapped
    np.testing.assert_array_equal(array, [1, 1, 1, 1])
    del array
    gc.collect()
    node_cache.entry("test:versions", "v3", fill(3))
    assert not first.exists() and not second.exists()


def test_remote_objects_share_the_bound(s3_bucket, monkeypatch):
    bound(monkeypatch, 25 * KB)
    data = {name: os.urandom(10 * KB) for name in "abc"}
    copies = {}
    for name, payload in data.items():
        storage.write_bytes_atomic(f"{s3_bucket}/{name}.bin", payload)
        copies[name] = storage.local_copy(f"{s3_bucket}/{name}.bin")
        assert copies[name].read_bytes() == payload
        time.sleep(0.02)
    assert not copies["a"].exists() and copies["b"].exists() and copies["c"].exists()
    assert storage.local_copy(f"{s3_bucket}/a.bin").read_bytes() == data["a"]  # fetched again


def test_bad_settings_are_refused_before_anything_is_written(s3_bucket, monkeypatch, cache_dir):
    storage.write_bytes_atomic(f"{s3_bucket}/x.bin", b"x")
    for value in ("abc", "0", "-1", "inf"):
        monkeypatch.setenv(node_cache.MAX_GB_ENV, value)
        with pytest.raises(StorageError, match=f"RETRO_CACHE_MAX_GB={value!r} is not a size"):
            storage.local_copy(f"{s3_bucket}/x.bin")
    assert not (cache_dir / node_cache.ENTRIES).exists()
    monkeypatch.delenv(node_cache.MAX_GB_ENV)
    for value in ("0", "two", "1.5", "-3"):
        monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, value)
        with pytest.raises(StorageError, match=f"RETRO_S3_MAX_ATTEMPTS={value!r} is not a number of tries"):
            storage.write_bytes_atomic(f"{s3_bucket}/y.bin", b"y")
    monkeypatch.delenv(storage.MAX_ATTEMPTS_ENV)
    assert storage.list_files(s3_bucket) == ["x.bin"]


def test_reads_ride_out_a_server_outage(s3_server, s3_bucket, monkeypatch):
    """The S3 endpoint goes away for 2 s in the middle of a download (open transfers cut, connections
    refused) and comes back: the retried requests finish the read with the right bytes. With one try
    the same outage is a clear error."""
    from tcp_relay import TcpRelay

    data = os.urandom(4 << 20)
    storage.write_bytes_atomic(f"{s3_bucket}/big.bin", data)
    relay = TcpRelay(("127.0.0.1", s3_server.port), bytes_per_second=4e6)  # ~1 s per download
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.endpoint)

        def outage() -> None:
            time.sleep(0.4)
            relay.down()
            time.sleep(2.0)
            relay.up()

        for read in (storage.read_bytes, lambda location: storage.local_copy(location).read_bytes()):
            before = relay.connections
            thread = threading.Thread(target=outage)
            thread.start()
            started = time.monotonic()
            assert read(f"{s3_bucket}/big.bin") == data
            thread.join()
            assert time.monotonic() - started > 2.0  # it did wait for the server
            assert relay.connections > before + 1  # ... by trying again

        monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "1")
        relay.down()
        with pytest.raises(StorageError, match="after 1 tries .*RETRO_S3_MAX_ATTEMPTS"):
            storage.read_bytes(f"{s3_bucket}/big.bin")
    finally:
        relay.close()


def test_the_cli_refuses_bad_settings_before_any_work(monkeypatch, tmp_path, capsys):
    from retro_platform.cli import main

    for name, value in ((node_cache.MAX_GB_ENV, "lots"), (storage.MAX_ATTEMPTS_ENV, "0")):
        monkeypatch.setenv(name, value)
        assert main(["build-db", "--config", "debug", "--set", f"work_dir={tmp_path / 'work'}"]) == 2
        assert f"{name}='{value}'" in capsys.readouterr().err
        monkeypatch.delenv(name)
    assert not (tmp_path / "work").exists()


def test_a_remote_folder_is_cached_once_and_refetched_when_a_file_changes(s3_bucket, cache_dir):
    """A checkpoint directory on S3 sits on this node once (``checkpoints.local_checkpoint``)."""
    from retro_platform.checkpoints import local_checkpoint

    folder = f"{s3_bucket}/run/checkpoint_000001"
    storage.write_bytes_atomic(f"{folder}/model.safetensors", b"weights")
    storage.write_bytes_atomic(f"{folder}/sub/train_state.pt", b"state")
    local = local_checkpoint(folder)
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert (local / "sub" / "train_state.pt").read_bytes() == b"state"
    assert local_checkpoint(folder) == local
    copies = sorted(p.name for p in cache_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert copies == ["model.safetensors", "train_state.pt"]  # one copy of each file
    time.sleep(1.05)  # S3's Last-Modified has whole seconds
    storage.write_bytes_atomic(f"{folder}/model.safetensors", b"weights 2")
    again = local_checkpoint(folder)
    assert again != local and not local.exists()
    assert (again / "model.safetensors").read_bytes() == b"weights 2"
