"""`retro demo` / `make demo`: the whole pipeline on the embedded defaults, on a local Ray.

Builds the database from the packaged Wikipedia summaries, trains a small RETRO and the same-size
decoder-only baseline on the same sequences (2 DDP workers each), evaluates both (valid bits-per-byte
with retrieval, retrieval off, baseline), prints the comparison, writes the loss curves, and generates a
completion with live retrieval, printing the neighbours it read.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import shutil
import time
from pathlib import Path

from retro_platform.compare import compare_experiment
from retro_platform.config import PlatformConfig
from retro_platform.db.build import build_database
from retro_platform.db.corpus import MIRROR_SUFFIX
from retro_platform.errors import CorpusError
from retro_platform.evaluate import run_evaluation
from retro_platform.generation import complete
from retro_platform.ray_utils import ray_session
from retro_platform.serve.pool import NeighborPool
from retro_platform.train.trainer import run_training

logger = logging.getLogger(__name__)

DEMO_PROMPT = (
    "Albert Einstein was a German-born theoretical physicist who is best known for developing the theory "
    "of relativity. Einstein also made important contributions to quantum mechanics. His mass-energy "
    "equivalence formula, which arises from special relativity, has been called the world's most famous "
    "equation. He received the 1921 Nobel Prize in Physics for"
)
"""The factual prompt of the demo's generation: longer than one chunk, so retrieval runs on it."""


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


def unseen_document(config: PlatformConfig, tokenizer, min_tokens: int) -> dict[str, str]:
    """A packaged Wikipedia summary outside the demo's corpus cut (never trained on, never in the
    database) with at least ``min_tokens`` tokens of ``tokenizer`` (the database's)."""
    from retro_platform.db.corpus import WIKIPEDIA, read_documents

    cut = config.database.corpus.max_documents
    if config.database.corpus.source != WIKIPEDIA or cut is None:
        raise CorpusError(
            "the demo's knowledge update takes an article from beyond the packaged Wikipedia's "
            "database.corpus.max_documents cut: use source 'wikipedia' with max_documents set"
        )
    docs = [d for d in read_documents(WIKIPEDIA, use_ray=False) if d["text"].strip()]
    for doc in docs[cut:]:
        if len(tokenizer.encode(doc["text"]).ids) >= min_tokens:
            return {"id": f"unseen-{doc['id']}", "title": doc.get("title", ""), "text": doc["text"]}
    raise CorpusError(f"no packaged article beyond the first {cut} has {min_tokens} tokens")


def knowledge_update(config: PlatformConfig, model) -> dict:
    """Add an unseen article to a copy of the database and greedy-complete its opening before and after.

    The prompt is the article's first chunk; after the addition its retrieval finds the article itself,
    whose continuation holds the words that follow. -> {prompt, truth, before, after, matched, words,
    scores}: ``matched`` the number of the article's next ``words`` words each completion reproduces in
    order, before and after.
    """
    from retro_platform.db.add_docs import add_documents
    from retro_platform.db.tokenizer import load_tokenizer

    m = config.database.chunk_len
    n_new = config.generate.max_new_tokens
    tokenizer = load_tokenizer(config.db_path)
    doc = unseen_document(config, tokenizer, m + n_new)
    copy = Path(config.work_dir) / "knowledge-update" / "db"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(config.db_path, copy)
    updated = dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, path=str(copy)),
        generate=dataclasses.replace(config.generate, temperature=0.0),
    )
    ids = tokenizer.encode(doc["text"]).ids
    prompt, truth = tokenizer.decode(ids[:m]), tokenizer.decode(ids[m : m + n_new])
    truth_words = truth.split()
    pool = NeighborPool.start(updated)
    try:
        before, _ = complete(updated, model, pool, prompt, prompt_ids=ids[:m])
        new_docs = copy.parent / "article.jsonl"
        new_docs.write_text(json.dumps(doc) + "\n")
        add_documents(updated, [str(new_docs)], pool=pool)
        after, used = complete(updated, model, pool, prompt, prompt_ids=ids[:m])
    finally:
        pool.shutdown()

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
    }


def run_demo(config: PlatformConfig, prompt: str = DEMO_PROMPT) -> dict:
    """Run the demo -> {'rows': comparison rows, 'completion': text, 'update': knowledge update}."""
    t0 = time.perf_counter()
    with ray_session(config) as session:
        print(f"[1/6] building the retrieval database in {config.db_path}")
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
        pool = session.start_pool(manifest)
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
        print("\n[6/6] knowledge update: add an article the model never saw, complete its opening again")
        update = knowledge_update(config, model)
        words = update["words"]
        print(f"opening:  {update['prompt']!r}")
        print(f"article:  {update['truth']!r}")
        print(f"before:   {update['before']!r}\n          ({update['matched'][0]}/{words} next words right)")
        print(
            f"after:    {update['after']!r}\n          ({update['matched'][1]}/{words} next words right; "
            f"the opening's neighbours scored {update['scores']})"
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
        return {"rows": rows, "completion": text, "update": update, "scores": scores}
