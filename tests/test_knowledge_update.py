"""Knowledge update without retraining: after `add-docs`, the same weights generate differently.

The model is the debug preset's architecture for this database with a wide initialisation (std 0.5),
so its greedy output depends visibly on every input, neighbours included: what is tested is the
platform's path (add-docs -> live pool -> generation retrieves for each completed chunk -> the model
reads the new neighbours), not what a few CPU training steps can learn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import numpy as np
import torch
from conftest import debug_config

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.checkpoints import model_for_database
from retro_platform.commands.generate import run_generation
from retro_platform.db.add_docs import add_documents
from retro_platform.db.embed import Embedder
from retro_platform.db.files import load_npy, parquet_file
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import load_manifest
from retro_platform.neighbors.pool import NeighborPool

FACT = (
    "The Zorblatt Quasiphone is a brass instrument that was invented in the year 2031 on the island of "
    "Velmora by the composer Ilse Brandtgaard, who tuned the Zorblatt Quasiphone to a scale of seventeen "
    "tones and played it for the first time in the harbour of Velmora. "
)
PROMPT = FACT + "The Zorblatt Quasiphone was invented by"


def neighbour_lines(printed: str) -> list[str]:
    """The neighbour lines `retro generate` prints under each retrieving chunk ("    0.412 'text'")."""
    return [line for line in printed.splitlines() if re.match(r"^ {4}-?\d\.\d{3} ", line)]


def test_added_document_changes_the_greedy_completion_without_retraining(debug_db, tmp_path, capsys):
    source, _ = debug_db
    shutil.copytree(source.db_path, tmp_path / "db")
    config = debug_config(tmp_path, "generate.max_new_tokens=48")
    manifest = load_manifest(config.db_path)
    torch.manual_seed(0)
    model = Retro(dataclasses.replace(model_for_database(config, manifest).model, init_std=0.5))
    checkpoint = tmp_path / "checkpoint"
    save_model_dir(checkpoint, model, extra={"step": 0, "tokenizer_sha256": manifest.tokenizer.sha256})

    before = run_generation(config, PROMPT, checkpoint=str(checkpoint))
    printed_before = capsys.readouterr().out
    assert neighbour_lines(printed_before)  # the prompt is longer than a chunk: its chunks retrieved
    assert not any("Zorblatt" in line for line in neighbour_lines(printed_before))

    new_docs = tmp_path / "fact.jsonl"
    new_docs.write_text(json.dumps({"id": "zorblatt", "text": FACT * 3}) + "\n")
    pool = NeighborPool.start(config)
    try:
        pool.refresh(config, add_documents(config, [str(new_docs)]))
    finally:
        pool.shutdown()
    capsys.readouterr()
    # the new shard's vectors are those the build gives the same texts: the database's encoder settings,
    # one encode call per row group of the chunk store (rows_per_task rows, as the build's shards), on
    # as many torch threads as the build's encoder actors (bf16 results depend on the thread count)
    layout = DatabaseLayout(config.db_path)
    chunks = parquet_file(layout.chunks("added", 0))
    assert chunks.metadata.row_group(0).num_rows <= manifest.fingerprint_inputs["embed.rows_per_task"]
    threads = torch.get_num_threads()
    embed = config.database.embed
    try:
        embedder = Embedder.from_manifest(
            load_manifest(config.db_path), threads=embed.threads_per_actor or math.ceil(embed.cpus_per_actor)
        )
        expected = [
            embedder.encode(chunks.read_row_group(g, columns=["text"]).column("text").to_pylist())
            for g in range(chunks.metadata.num_row_groups)
        ]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(load_npy(layout.embeddings("added", 0)), np.concatenate(expected))

    after = run_generation(config, PROMPT, checkpoint=str(checkpoint))  # a fresh pool, from disk
    printed_after = capsys.readouterr().out
    # the prompt's chunks now read the new document ...
    assert any("Zorblatt" in line for line in neighbour_lines(printed_after))
    assert after != before  # ... and the same weights complete the prompt differently
    assert run_generation(config, PROMPT, checkpoint=str(checkpoint)) == after  # deterministic


def test_demo_knowledge_update_adds_an_unseen_article_to_a_copy_of_the_database(debug_db, tmp_path):
    """The demo's step 6: an article from beyond the corpus cut is added to a copy of the database; a
    span of it that starts mid-sentence then retrieves the article itself, the window the model reads
    continues with the article's next chunk, and the demo's database stays as it was."""
    from retro_platform.commands.demo import knowledge_update

    source, _ = debug_db
    shutil.copytree(source.db_path, tmp_path / "db")
    config = debug_config(tmp_path, "generate.max_new_tokens=16")
    manifest_before = (tmp_path / "db" / "manifest.json").read_bytes()
    torch.manual_seed(0)
    model = Retro(model_for_database(config, load_manifest(config.db_path)).model)

    update = knowledge_update(config, model)

    assert update["scores"] and update["scores"][0] > 0.8  # the prompt found its own article ...
    assert update["lined_up"]  # ... and reads its continuation
    assert update["truth"].split()[: update["words"]] and update["words"] > 0
    assert 0 <= update["matched"][0] <= update["words"] and 0 <= update["matched"][1] <= update["words"]
    assert (tmp_path / "db" / "manifest.json").read_bytes() == manifest_before
    copy = load_manifest(tmp_path / "knowledge-update" / "db")
    assert copy.counts.documents["added"] == 1


ARTICLE = (
    "The Harbour of Velmora was dug by hand between 1802 and 1809 by the fishermen of Quillon, who carried "
    "the stones on ox carts from the quarry at Brandt Hill. Its lighthouse, painted in green and white bands, "
    "was lit for the first time on the night of the great storm of 1811, when it guided nineteen boats home. "
    "The harbour master Oskar Felding kept a diary of every ship that entered, and his forty volumes are now "
    "kept in the town library, next to a model of the schooner Marianne, which sank off the northern reef in "
    "1834 with a cargo of salt, copper pans and church bells cast in the foundry of Tessaly. "
    "Each summer the town holds a regatta in which rowing crews race from the breakwater to the bell buoy."
)


def test_any_span_of_an_added_document_reads_the_words_that_follow_it(debug_db, tmp_path):
    """After `add-docs`, a prompt chunk that starts anywhere in the new document (mid-sentence, at any
    token) retrieves it, and the window the model reads (``neighbor_alignment="match"``, the default)
    continues with the document's next chunk token for token; the retrieved chunk + continuation of the
    paper ("none") only does so when the prompt starts on a stored chunk boundary."""
    from retro_platform.db.tokenizer import load_tokenizer
    from retro_platform.generation import PoolRetriever

    source, _ = debug_db
    shutil.copytree(source.db_path, tmp_path / "db")
    config = debug_config(tmp_path)
    m = config.database.chunk_len
    new_docs = tmp_path / "article.jsonl"
    new_docs.write_text(json.dumps({"id": "velmora-harbour", "text": ARTICLE}) + "\n")
    tokenizer = load_tokenizer(config.db_path)
    ids = tokenizer.encode(ARTICLE).ids
    starts = [0, 5, 17, 30, 41, 58]
    assert len(ids) >= max(starts) + 2 * m
    pool = NeighborPool.start(config)
    try:
        pool.refresh(config, add_documents(config, [str(new_docs)]))
        embedder = Embedder.from_manifest(load_manifest(config.db_path), out_dtype="float32")
        retrievers = {
            align: PoolRetriever(pool, tokenizer, embedder, config.model.num_neighbors, align=align)
            for align in (True, False)
        }
        for start in starts:
            chunk, following = ids[start : start + m], ids[start + m : start + 2 * m]
            reads = {
                align: retriever(torch.tensor(chunk)).tolist() for align, retriever in retrievers.items()
            }
            assert any(w[:m] == chunk and w[m:] == following for w in reads[True]), start
            assert any(w[m:] == following for w in reads[False]) == (start == 0), start
    finally:
        pool.shutdown()
