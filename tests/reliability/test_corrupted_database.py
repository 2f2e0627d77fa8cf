"""A damaged database file is refused by every command that opens it, naming the file; build-db repairs it.

Three kinds of damage (a truncated index shard, a Parquet file with altered bytes, a manifest whose
recorded checksum is wrong) x six commands that open a database (query-neighbors, neighbors, add-docs,
train, eval, generate), all through the CLI entry point: exit code 2, one line naming the file, and
nothing written. Then `retro build-db` rebuilds what is damaged, and the database is byte-identical
(same checksums, same id) to the original build. Stages check sizes and modification times;
`retro verify-db` every checksum.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.checkpoints import model_for_database
from retro_platform.cli import main
from retro_platform.db.manifest import validate_database
from retro_platform.errors import DatabaseError


def truncate_index_shard(db):
    """Cut an index shard to its first 100 bytes -> the damaged file."""
    target = db / "index" / "shard-0001.faiss"
    target.write_bytes(target.read_bytes()[:100])
    return "index/shard-0001.faiss"


def alter_parquet(db):
    """Flip bytes inside a chunk-store Parquet file (same size) -> the damaged file."""
    target = db / "chunks" / "train" / "shard-0000.parquet"
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    target.write_bytes(bytes(data))
    return "chunks/train/shard-0000.parquet"


def wrong_manifest_checksum(db):
    """Record a wrong checksum for an embeddings file in the manifest -> the file it names."""
    manifest = json.loads((db / "manifest.json").read_text())
    manifest["files"]["embeddings/train/shard-0001.npy"] = "0" * 64
    (db / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return "embeddings/train/shard-0001.npy"


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", [truncate_index_shard, alter_parquet, wrong_manifest_checksum])
def test_every_command_refuses_a_damaged_database_and_build_db_repairs_it(debug_db, tmp_path, capsys, damage):
    source, original = debug_db
    work = tmp_path / "work"
    shutil.copytree(source.db_path, work / "db")
    config = debug_config(work, "tracking.experiment=damaged")
    checkpoint = work / "checkpoint"
    torch.manual_seed(0)
    save_model_dir(
        checkpoint,
        Retro(dataclasses.replace(model_for_database(config, original).model)),
        extra={"step": 0, "tokenizer_sha256": original.tokenizer.sha256},
    )
    new_docs = tmp_path / "new.jsonl"
    new_docs.write_text(json.dumps({"id": "new", "text": "A new document about nothing much."}) + "\n")

    damaged = damage(config.db_path)
    before = snapshot(work)
    common = ["--config", "debug", "--set", f"work_dir={work}", "--set", "tracking.experiment=damaged"]
    commands = {
        "query-neighbors": [],
        "neighbors": ["--chunk-id", "0"],
        "add-docs": [str(new_docs)],
        "train": [],
        "eval": ["--checkpoint", str(checkpoint)],
        "generate": ["--prompt", "hello", "--checkpoint", str(checkpoint)],
    }
    for command, extra in commands.items():
        capsys.readouterr()
        assert main([command, *common, *extra]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"retro {command}: error:"), err
        assert damaged in err, f"{command}: {err}"
        assert snapshot(work) == before, f"{command} wrote or changed files"

    assert main(["build-db", *common]) == 0
    repaired = validate_database(config.db_path)
    assert repaired.files == original.files
    assert repaired.db_id == original.db_id


def test_stages_check_sizes_and_times_and_verify_db_every_checksum(debug_db, tmp_path, capsys):
    """Starting a stage checks each file's size and modification time against the manifest (hashing only
    files whose time changed); `retro verify-db` hashes every file."""
    source, _ = debug_db
    work = tmp_path / "work"
    shutil.copytree(source.db_path, work / "db")  # copy2 keeps the modification times
    config = debug_config(work, "tracking.experiment=verify")
    common = ["--config", "debug", "--set", f"work_dir={work}"]
    capsys.readouterr()
    assert main(["verify-db", *common]) == 0
    assert "files match their checksums" in capsys.readouterr().out

    damaged = "chunks/train/shard-0000.parquet"
    target = config.db_path / damaged
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, time put back
    validate_database(config.db_path)  # the quick check trusts an unchanged size and time
    assert main(["verify-db", *common]) == 2
    assert damaged in capsys.readouterr().err

    os.utime(target)  # a new modification time: the quick check hashes the file
    with pytest.raises(DatabaseError, match=damaged):
        validate_database(config.db_path)
    target.write_bytes(bytes(data[:-10]))  # another size: refused without hashing
    with pytest.raises(DatabaseError, match="bytes"):
        validate_database(config.db_path)
