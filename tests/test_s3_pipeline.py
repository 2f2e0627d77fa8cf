"""The debug pipeline on object storage: build -> train -> eval -> add-docs -> generate with every input
and output in an ``s3://`` bucket of a real S3-compatible server (moto's standalone server on 127.0.0.1):
the corpus (the packaged Wikipedia summaries the debug preset reads, as JSON Lines objects read through a
glob), the documents `retro add-docs` adds, the database, checkpoints and MLflow artifacts. The database
it builds is byte for byte the one the same documents give locally.

Each step is the `retro` command a user runs, with ``work_dir=s3://<bucket>/work``, joining one Ray head
(conftest's ``ray_head``: ``ray start --head``, as on a cluster) whose processes never had the AWS
variables: its workers get them only through the platform's runtime env. Only the MLflow tracking
metadata (a SQLite file: MLflow cannot keep it on S3; on a cluster it is the MLflow server) and the
node-local cache (``RETRO_CACHE_DIR``) may be written locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retro_platform import storage
from retro_platform.db.corpus import WIKIPEDIA, read_documents
from retro_platform.db.manifest import validate_database

RETRO = str(Path(sys.executable).with_name("retro"))
NEW_DOCUMENT = (
    '{"id": "zorblax", "text": "The Zorblax engine was invented in 2031 by the engineer Mira Tal to power '
    'orbital greenhouses."}\n'
)


@pytest.mark.slow
def test_debug_pipeline_runs_on_s3_and_writes_nothing_local_but_caches(
    s3_server, s3_bucket, tmp_path, debug_db, ray_head
):
    work = f"{s3_bucket}/work"
    local = tmp_path / "local"
    local.mkdir()
    documents = f"{s3_bucket}/inputs/new.jsonl"
    storage.write_bytes_atomic(documents, NEW_DOCUMENT.encode())
    # the packaged corpus's first documents as two JSON Lines objects, in its order: the preset's
    # max_documents cut (300) takes all of the first object and part of the second
    lines = [
        json.dumps({"id": d["id"], "text": d["text"], "title": d["title"]})
        for d in read_documents(WIKIPEDIA, use_ray=False)[:400]
    ]
    first = len(lines) * 2 // 5
    for part, chunk in enumerate((lines[:first], lines[first:])):
        storage.write_bytes_atomic(
            f"{s3_bucket}/corpus/part-{part}.jsonl", ("\n".join(chunk) + "\n").encode()
        )
    env = {
        **os.environ,
        **s3_server.env(),
        "RETRO_CACHE_DIR": str(local / "cache"),
        "RAY_ADDRESS": ray_head.address,  # each command joins the head, as on a cluster
    }
    settings = [
        "--config",
        "debug",
        "--set",
        f"work_dir={work}",
        "--set",
        f"database.corpus.source={s3_bucket}/corpus/part-*.jsonl",
        "--set",
        f"tracking.uri=sqlite:///{local / 'mlflow.db'}",
        "--set",
        "ray.include_dashboard=false",
        "--set",
        "train.steps=6",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.checkpoint_every=3",
    ]
    outputs = {}
    for step in (
        ["build-db"],
        ["train"],
        ["eval"],
        ["add-docs", documents],
        ["generate", "--prompt", "The Zorblax engine"],
    ):
        result = subprocess.run(
            [RETRO, *step, *settings], env=env, cwd=local, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"retro {step[0]}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs[step[0]] = result.stdout
        if step[0] == "build-db":  # the same database as the local build of the same documents
            built, expected = f"{work}/db", str(debug_db[0].db_path)
            names = storage.list_files(built)
            assert names == storage.list_files(expected)
            differ = [
                n
                for n in names
                if storage.read_bytes(f"{built}/{n}") != storage.read_bytes(f"{expected}/{n}")
            ]
            assert differ == ["manifest.json"]

    # everything the pipeline made is in the bucket
    names = storage.list_files(work)
    for expected in ("db/manifest.json", "db/tokenizer.json", "db/index/trained.faiss"):
        assert expected in names
    assert any(n.startswith("db/chunks/added/") for n in names)  # add-docs wrote its shard there
    assert any(n.endswith("/model.safetensors") and "/checkpoint_" in n for n in names)  # Ray Train
    assert any(n.startswith("mlartifacts/") and n.endswith("model.safetensors") for n in names)  # MLflow
    manifest = validate_database(f"{work}/db", check_files="full")
    assert manifest.counts.documents["added"] == 1
    # the new document is retrieved for its own opening, straight from the S3 database
    assert "0.5" in outputs["generate"] or "0.6" in outputs["generate"] or "0.7" in outputs["generate"]
    assert "The Zorblax engine was invented in 2031" in outputs["generate"]
    # locally: the inputs, the tracking metadata and the node-local cache, nothing else
    written = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith("cache/")] == ["mlflow.db"], written
    assert any(p.startswith("cache/") for p in written)  # FAISS shards and arrays read through the cache
