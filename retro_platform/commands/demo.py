"""`retro demo` / `make demo`: the whole pipeline on the embedded defaults, on a local Ray.

Builds the database from the packaged Wikipedia summaries (or any corpus: ``--set
database.corpus.source=<file>``), trains a small RETRO and the same-size decoder-only baseline on the
same sequences (2 DDP workers each), evaluates both (valid bits-per-byte with retrieval, retrieval off,
baseline), prints the comparison, writes the loss curves, generates a completion with live retrieval,
printing the neighbours it read, and adds a document the model never saw to a copy of the database.

Before the first stage ``check_demo`` checks what the later steps need (the corpus, a document for the
knowledge update, local paths, the lengths generation needs, a database folder the build accepts), and
holds one document out of the build when the corpus has no cut to take one from; right after the build
``check_built_database`` checks what needs the tokenizer and the database, before any training.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time
from collections.abc import Iterator

from retro_platform import storage
from retro_platform.commands.build_db import build_database
from retro_platform.commands.compare import compare_experiment
from retro_platform.commands.evaluate import run_evaluation
from retro_platform.commands.train import run_training
from retro_platform.config import CorpusConfig, PlatformConfig
from retro_platform.db.corpus import MIRROR_SUFFIX, WIKIPEDIA, corpus_files, iter_documents
from retro_platform.errors import ConfigError, CorpusError, DatabaseError
from retro_platform.generation import complete
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)

DEMO_PROMPT = (
    "Albert Einstein was a German-born theoretical physicist who is best known for developing the theory "
    "of relativity. Einstein also made important contributions to quantum mechanics. His mass-energy "
    "equivalence formula, which arises from special relativity, has been called the world's most famous "
    "equation. He received the 1921 Nobel Prize in Physics for"
)
"""The factual prompt of the demo's generation: longer than one chunk, so retrieval runs on it."""

HOLD_OUT_BYTES_PER_TOKEN = 6
"""Bytes of text per token assumed before the tokenizer exists, to pick a document long enough for the
knowledge update: more than byte-level BPE packs into a token of prose (on the Wikipedia summaries
~2.5 at vocab 1024, ~3.3 at 4096, ~4.1 at 8192, ~4.9 at 32000), so a document chosen by its size
almost surely has the tokens. ``check_built_database`` counts them with the real tokenizer."""


def variant(config: PlatformConfig, kind: str, comparison: str, label: str | None = None) -> PlatformConfig:
    """The RETRO or baseline run of one comparison (same data, same decoder).

    ``kind`` ('retro' or anything else for the baseline) sets ``model.retrieval``; the run is named
    ``<train.name>-<label>`` (``label`` defaults to ``kind``; give another one for a second run of the
    same kind, e.g. a baseline trained for more steps).
    """
    label = label or kind
    model = dataclasses.replace(config.model, retrieval=kind == "retro")
    train = dataclasses.replace(config.train, name=f"{config.train.name}-{label}")
    tracking = dataclasses.replace(
        config.tracking, comparison=comparison, run_name=f"{config.train.name}-{label}"
    )
    return dataclasses.replace(config, model=model, train=train, tracking=tracking)


def update_prompt_start(config: PlatformConfig) -> int:
    """Token at which the knowledge update's prompt starts in its document: mid-sentence, 3/8 of a chunk
    in (24 tokens at 64), so the prompt's chunk lines up with none of the stored document's chunks."""
    return max(1, 3 * config.database.chunk_len // 8)


def update_tokens(config: PlatformConfig) -> int:
    """Tokens the knowledge update needs from its document: up to the prompt's start
    (``update_prompt_start``), the prompt (one chunk of ``database.chunk_len``) and the
    ``generate.max_new_tokens`` that follow it."""
    return update_prompt_start(config) + config.database.chunk_len + config.generate.max_new_tokens


def takes_beyond_cut(corpus: CorpusConfig) -> bool:
    """True when the knowledge update takes its document from beyond the ``max_documents`` cut (the
    packaged Wikipedia with a cut); otherwise the demo holds one document of the corpus out of the build."""
    return corpus.source == WIKIPEDIA and corpus.max_documents is not None


def left_out_documents(corpus: CorpusConfig) -> Iterator[dict[str, str]]:
    """The non-empty documents of a corpus its database does not hold, in corpus order: those named in
    ``exclude_ids`` and those beyond the ``max_documents`` cut (counted as the build counts: empty and
    excluded documents do not count towards it). Reads the corpus only as far as they go."""
    excluded = set(corpus.exclude_ids)
    kept, seen = 0, 0
    for doc in iter_documents(corpus.source, int(corpus.piece_mb * 1024**2)):
        if doc["id"] in excluded:
            seen += 1
            if doc["text"].strip():
                yield doc
        elif doc["text"].strip():
            if corpus.max_documents is not None and kept >= corpus.max_documents:
                yield doc
            kept += 1
        if corpus.max_documents is None and seen == len(excluded):
            return  # nothing after the last excluded document is left out


def unseen_document(config: PlatformConfig, tokenizer, min_tokens: int) -> dict[str, str]:
    """A document the database does not hold (never trained on) with at least ``min_tokens`` tokens of
    ``tokenizer`` (the database's): the first, in corpus order, of those ``database.corpus.exclude_ids``
    holds out (``check_demo`` holds one out of a corpus without a cut) and, for the packaged Wikipedia
    with a cut, of the articles beyond it. -> {id (``unseen-<corpus id>``), title, text}."""
    corpus = config.database.corpus
    if not corpus.exclude_ids and not takes_beyond_cut(corpus):
        raise CorpusError(
            "the demo's knowledge update adds a document the database does not hold: use the packaged "
            "Wikipedia with database.corpus.max_documents set, or hold a document out of the database "
            "with database.corpus.exclude_ids (`retro demo` holds one out itself)"
        )
    short: list[tuple[str, int]] = []
    for doc in left_out_documents(corpus):
        n_tokens = len(tokenizer.encode(doc["text"]).ids)
        if n_tokens >= min_tokens:
            return {"id": f"unseen-{doc['id']}", "title": doc.get("title", ""), "text": doc["text"]}
        short.append((doc["id"], n_tokens))
    need = (
        f"{min_tokens} tokens of the database's tokenizer (the prompt starts 3/8 of a chunk in, then one "
        "chunk, then generate.max_new_tokens)"
    )
    if takes_beyond_cut(corpus):
        raise CorpusError(
            f"no packaged article beyond the first {corpus.max_documents} (database.corpus.max_documents) "
            f"has {need}: lower max_documents or generate.max_new_tokens"
        )
    found = ", ".join(f"{doc_id!r} has {n}" for doc_id, n in short[:3]) or "none is in the corpus"
    raise CorpusError(
        f"the document(s) held out of the database for the knowledge update are too short: {found}; it "
        f"needs {need}. Lower generate.max_new_tokens, or hold out a longer document with "
        "--set database.corpus.exclude_ids=[<its id>]"
    )


def choose_held_out(corpus: CorpusConfig, min_tokens: int) -> dict[str, str]:
    """The document the demo holds out of a corpus for its knowledge update: the first non-empty one, in
    corpus order, with at least ``min_tokens`` tokens estimated at ``HOLD_OUT_BYTES_PER_TOKEN`` bytes of
    UTF-8 text each (the tokenizer does not exist yet). Reads the corpus only until it has that document
    and one the database keeps; raises CorpusError when either is missing."""
    need_bytes = min_tokens * HOLD_OUT_BYTES_PER_TOKEN
    excluded = set(corpus.exclude_ids)
    chosen, others = None, 0
    for doc in iter_documents(corpus.source, int(corpus.piece_mb * 1024**2)):
        if not doc["text"].strip():
            continue
        if chosen is None and len(doc["text"].encode("utf-8")) >= need_bytes:
            chosen = doc
        elif doc["id"] not in excluded:
            others += 1
        if chosen is not None and others:
            return chosen
    if chosen is None:
        raise CorpusError(
            f"the demo's knowledge update holds one document of {corpus.source} out of the database and adds "
            f"it later, and no document is long enough: it needs {min_tokens} tokens (the prompt starts 3/8 of a "
            f"chunk in, then one chunk of database.chunk_len, then generate.max_new_tokens), about {need_bytes} bytes of text at {HOLD_OUT_BYTES_PER_TOKEN} bytes "
            "per token. Lower generate.max_new_tokens, or add a longer document"
        )
    raise CorpusError(
        f"corpus {corpus.source} has no document besides {chosen['id']!r} ({chosen['where']}), which the demo "
        "holds out of the database for its knowledge update: add documents"
    )


def check_demo(config: PlatformConfig) -> tuple[PlatformConfig, dict[str, str] | None]:
    """Check, before any work, what every step of the demo needs -> (the config to run, the document held
    out of the build, or None when the knowledge update takes a packaged article beyond the cut).

    Raises ConfigError, CorpusError or DatabaseError naming what to change when: the work directory or
    database is not a local folder (step 6 copies the database; MLflow's store is a SQLite file there);
    ``database.corpus.valid_fraction`` is 0 (steps 2-3 evaluate on the valid split); one chunk and
    ``generate.max_new_tokens`` exceed ``model.max_seq_len`` (steps 5-6 generate that far); the corpus is
    missing, unreadable or empty; no document can serve the knowledge update (the packaged Wikipedia
    with a cut: an article beyond it; any other corpus: a document of about ``update_tokens`` tokens to
    hold out, plus one to build from); or ``database.path`` holds a database built with other settings.
    For a corpus without a cut the returned config lists the held-out document in
    ``database.corpus.exclude_ids``, so neither the database nor training ever see it.
    """
    for setting, location in (("work_dir", config.work_dir), ("database.path", str(config.db_path))):
        if storage.is_remote(location):
            raise ConfigError(
                f"config error in {setting}: the demo runs on local folders (its knowledge update copies the "
                f"database; MLflow's store is a SQLite file in work_dir), got {location}"
            )
    corpus = config.database.corpus
    if corpus.valid_fraction <= 0:
        raise ConfigError(
            "config error in database.corpus.valid_fraction: the demo evaluates both models on the valid "
            "split; set it above 0 (e.g. 0.05)"
        )
    sequence = config.database.chunk_len + config.generate.max_new_tokens  # the prompt chunk + completion
    if sequence > config.model.max_seq_len:
        raise ConfigError(
            f"config error in generate.max_new_tokens: the knowledge update completes one chunk "
            f"(database.chunk_len={config.database.chunk_len}) by generate.max_new_tokens="
            f"{config.generate.max_new_tokens} tokens, {sequence} in all, more than model.max_seq_len="
            f"{config.model.max_seq_len}; lower generate.max_new_tokens"
        )
    _, files = corpus_files(corpus.source)
    unreadable = [f for _, f in files if not storage.is_remote(f) and not os.access(f, os.R_OK)]
    if unreadable:
        raise CorpusError(
            f"corpus {corpus.source}: cannot read {unreadable[:3]}; give this user read access "
            "(database.corpus.source)"
        )
    held_out = None
    need = update_tokens(config)
    if takes_beyond_cut(corpus):
        need_bytes = need * HOLD_OUT_BYTES_PER_TOKEN
        lengths = [len(doc["text"].encode("utf-8")) for doc in left_out_documents(corpus)]
        if max(lengths, default=0) < need_bytes:
            found = f"none of the {len(lengths)} is long enough" if lengths else "there is none"
            raise CorpusError(
                f"the demo's knowledge update adds a packaged article beyond the first {corpus.max_documents} "
                f"(database.corpus.max_documents), and {found}: it needs {need} tokens (the prompt starts 3/8 "
                f"of a chunk in, then one chunk, then generate.max_new_tokens), about {need_bytes} bytes. Lower max_documents, set it to null (the "
                "demo then holds one article out of the database), or lower generate.max_new_tokens"
            )
    else:
        held_out = choose_held_out(corpus, need)
        if held_out["id"] not in corpus.exclude_ids:
            corpus = dataclasses.replace(corpus, exclude_ids=[*corpus.exclude_ids, held_out["id"]])
            config = dataclasses.replace(config, database=dataclasses.replace(config.database, corpus=corpus))
    check_database_folder(config)
    return config, held_out


def check_database_folder(config: PlatformConfig) -> None:
    """Refuse now what the build refuses only after reading the whole corpus: a ``database.path`` that
    holds something other than a database, or a database built with other settings (the corpus content
    is compared by the build itself)."""
    from retro_platform.db.build.ledger import Ledger, fingerprint_inputs
    from retro_platform.db.layout import DatabaseLayout
    from retro_platform.db.manifest import load_manifest

    layout = DatabaseLayout(config.db_path)
    if not storage.exists(layout.root):
        return
    digest = ""
    if storage.exists(layout.manifest):
        try:
            previous = load_manifest(layout.root)
        except DatabaseError:
            return  # the build warns and rebuilds it
        digest = (previous.fingerprint_inputs or {}).get("corpus.digest")
        if not digest:
            return  # a database from before fingerprint inputs were recorded: the build decides
    Ledger(layout).load_previous(fingerprint_inputs(config, digest))


def check_built_database(config: PlatformConfig, manifest, prompt: str) -> None:
    """Check, right after the build and before any training, what needs the tokenizer and the database:
    the knowledge update's document has ``update_tokens`` real tokens; the prompt and
    ``generate.max_new_tokens`` fit ``model.max_seq_len``; the train split gives every DDP worker a batch
    of sequences and the valid split one sequence; checkpoints the runs would resume from fit this database.
    Raises ConfigError, CorpusError, DatabaseError or CheckpointError naming what to change."""
    from retro_platform.checkpoints import check_resumable, latest_checkpoint, model_for_database
    from retro_platform.db.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.db_path)
    unseen_document(config, tokenizer, update_tokens(config))
    n_prompt = len(tokenizer.encode(prompt).ids)
    if n_prompt + config.generate.max_new_tokens > config.model.max_seq_len:
        raise ConfigError(
            f"config error in generate.max_new_tokens: the demo's prompt is {n_prompt} tokens, and with "
            f"generate.max_new_tokens={config.generate.max_new_tokens} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}; lower generate.max_new_tokens"
        )
    train = config.train
    per_seq = train.seq_len // manifest.chunk_len
    sequences = {split: manifest.counts.chunks.get(split, 0) // per_seq for split in ("train", "valid")}
    if sequences["train"] // train.num_workers < train.batch_size:
        raise DatabaseError(
            f"the train split of {config.db_path} has {sequences['train']} sequences of {train.seq_len} "
            f"tokens, fewer than train.num_workers={train.num_workers} x train.batch_size={train.batch_size}: "
            "add documents, or lower train.seq_len, train.batch_size or train.num_workers"
        )
    if sequences["valid"] < 1:
        raise DatabaseError(
            f"the valid split of {config.db_path} has {manifest.counts.chunks.get('valid', 0)} chunks, fewer "
            f"than one sequence of {train.seq_len} tokens, and the demo evaluates on it: raise "
            "database.corpus.valid_fraction, add documents, or lower train.seq_len"
        )
    for kind in ("retro", "baseline"):
        run_config = model_for_database(variant(config, kind, comparison=""), manifest)
        previous = latest_checkpoint(run_config.storage_path, run_config.train.name)
        if previous is not None:
            check_resumable(run_config, previous, manifest)


def knowledge_update(config: PlatformConfig, model) -> dict:
    """Add an unseen article to a copy of the database and greedy-complete a span of it before and after.

    The prompt is one chunk of the article that starts mid-sentence (``update_prompt_start``), so it lines
    up with none of the stored chunks; after the addition its retrieval finds the article itself, and the
    window the pool returns (lined up with the prompt: ``RetroConfig.neighbor_alignment``) continues with
    the words that follow. -> {prompt, truth, before, after, matched, words, scores, lined_up}:
    ``matched`` the number of the article's next ``words`` words each completion reproduces in order,
    before and after; ``lined_up`` whether a window the model read after the addition continues with the
    article's next chunk token for token.
    """
    from retro_platform.db.add_docs import add_documents
    from retro_platform.db.tokenizer import load_tokenizer

    m = config.database.chunk_len
    n_new = config.generate.max_new_tokens
    tokenizer = load_tokenizer(config.db_path)
    doc = unseen_document(config, tokenizer, update_tokens(config))
    copy = storage.join(str(config.work_dir), "knowledge-update", "db")
    storage.delete_tree(copy)
    storage.copy_tree(str(config.db_path), copy)
    updated = dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, path=str(copy)),
        generate=dataclasses.replace(config.generate, temperature=0.0),
    )
    start = update_prompt_start(config)
    ids = tokenizer.encode(doc["text"]).ids[start:]
    prompt, truth = tokenizer.decode(ids[:m]), tokenizer.decode(ids[m : m + n_new])
    truth_words = truth.split()
    pool = NeighborPool.start(updated)
    try:
        before, _ = complete(updated, model, pool, prompt, prompt_ids=ids[:m])
        new_docs = storage.join(storage.parent(copy), "article.jsonl")
        storage.write_bytes_atomic(new_docs, (json.dumps(doc) + "\n").encode())
        pool.refresh(updated, add_documents(updated, [new_docs]))
        after, used = complete(updated, model, pool, prompt, prompt_ids=ids[:m])
        windows = prompt_windows(updated, model, pool, tokenizer, ids[:m])
    finally:
        pool.shutdown()
    lined_up = any(list(window[m:]) == ids[m : 2 * m] for window in windows)

    def matched(text: str) -> int:
        """The article's next words that ``text`` reproduces in order (a longest common subsequence of
        words: one wrong word costs one, not everything after it)."""
        blocks = difflib.SequenceMatcher(
            None, text.split(), truth_words, autojunk=False
        ).get_matching_blocks()
        return sum(block.size for block in blocks)

    return {
        "prompt": prompt,
        "truth": truth,
        "before": before,
        "after": after,
        "matched": (matched(before), matched(after)),
        "words": len(truth_words),
        "scores": [round(s, 3) for s in used[0][2]] if used else [],
        "lined_up": lined_up,
    }


def prompt_windows(config: PlatformConfig, model, pool: NeighborPool, tokenizer, chunk_ids: list[int]):
    """The neighbour windows [k, r] (token ids) the model reads for one prompt chunk, as ``complete``
    retrieves them."""
    import torch

    from retro_platform.db.embed import Embedder
    from retro_platform.db.manifest import load_manifest
    from retro_platform.generation import PoolRetriever

    embedder = Embedder.from_manifest(load_manifest(config.db_path), out_dtype="float32")
    align = model.config.neighbor_alignment == "match"
    retriever = PoolRetriever(pool, tokenizer, embedder, model.config.num_neighbors, align)
    return retriever(torch.tensor(chunk_ids, dtype=torch.long)).tolist()


def run_demo(config: PlatformConfig, prompt: str = DEMO_PROMPT) -> dict:
    """Run the demo -> {'rows': comparison rows, 'completion': text, 'update': knowledge update}.

    ``check_demo`` runs first: input that a later step would refuse is refused before any work is done
    (and for a corpus without a cut, one document is held out of the build for the knowledge update)."""
    t0 = time.perf_counter()
    config, held_out = check_demo(config)
    with ray_session(config) as session:
        print(f"[1/6] building the retrieval database in {config.db_path}")
        if held_out is not None:
            print(
                f"      held out of the database and of training, for the knowledge update (step 6): "
                f"document {held_out['id']!r} ({held_out['where']})"
            )
        manifest = build_database(config)
        counts = manifest.counts
        print(
            f"      {sum(counts.documents.values())} documents, {sum(counts.chunks.values())} chunks, "
            f"index {manifest.index.factory} in {len(manifest.index.shards)} shards"
        )
        if config.database.corpus.mirror:
            print(
                f"      mirrored corpus: each article appears twice (as <id> and <id>{MIRROR_SUFFIX}), so most "
                "chunks have an exact twin to retrieve; this shows the model reading its neighbours"
            )
        check_built_database(config, manifest, prompt)
        pool = session.own(NeighborPool.start(config, manifest))
        comparison = f"{config.train.name}-{manifest.db_id}"
        trained, scores = {}, {}
        for step, kind in ((2, "retro"), (3, "baseline")):
            run_config = variant(config, kind, comparison)
            print(
                f"[{step}/6] training {kind} ({config.train.num_workers} DDP workers, {config.train.steps} steps)"
            )
            trained[kind] = run_training(run_config, pool=pool if kind == "retro" else None)
            scores[kind] = run_evaluation(run_config, checkpoint=trained[kind]["checkpoint"], pool=pool)
        print("[4/6] comparison (valid bits per byte; lower is better)\n")
        rows = compare_experiment(config, comparison=comparison)
        retro, baseline = scores["retro"], scores["baseline"]
        print(
            f"\nRETRO reading its neighbours: {retro['valid_bpb_retrieval']:.4f} bits per byte; the same "
            f"model with retrieval off: {retro['valid_bpb_no_retrieval']:.4f}; the baseline: "
            f"{baseline['valid_bpb_no_retrieval']:.4f} "
            f"({retro['valid_bpb_retrieval'] / baseline['valid_bpb_no_retrieval']:.2f}x the baseline)"
        )
        print(f"\n[5/6] generation with live retrieval\nprompt: {prompt!r}")
        from retro_model.checkpoint import load_model_dir

        model, _ = load_model_dir(trained["retro"]["checkpoint"])
        text, used = complete(config, model, pool, prompt)
        print(f"completion: {text!r}")
        for chunk_text, ids, neighbour_scores in used:
            print(
                f"  chunk {chunk_text[:50]!r}... read neighbours {ids} "
                f"(scores {[round(s, 3) for s in neighbour_scores]})"
            )
        print(
            "\n[6/6] knowledge update: add an article the model never saw, complete a span of it that starts "
            "mid-sentence again"
        )
        update = knowledge_update(config, model)
        words = update["words"]
        print(f"prompt:   {update['prompt']!r}")
        print(f"article:  {update['truth']!r}")
        print(f"before:   {update['before']!r}\n          ({update['matched'][0]}/{words} next words right)")
        print(
            f"after:    {update['after']!r}\n          ({update['matched'][1]}/{words} next words right; "
            f"the prompt's neighbours scored {update['scores']})"
        )
        if update["matched"][1] < words // 2:
            print(
                "          at this budget the model reads its neighbours (the comparison above) but does not yet\n"
                "          copy them word for word: benchmarks/RESULTS-retrieval.md has the gap growing with steps"
            )
        else:
            print(
                "          the model wrote what the new article says: it read it from the database, not its weights"
            )
        print(
            f"\ndone in {time.perf_counter() - t0:.0f}s. MLflow store: {config.tracking_uri}\n"
            f"open the UI: mlflow ui --backend-store-uri {config.tracking_uri} --host 127.0.0.1 --port 5000"
        )
        registered = trained["retro"].get("registered_model", "").rsplit("/", 1)[0]
        print(
            f"serve the RETRO model over HTTP (a page at http://{config.serve.host}:{config.serve.port}/, "
            f"documents added while it runs): retro serve --model {registered}/latest"
        )
        return {"rows": rows, "completion": text, "update": update, "scores": scores}
