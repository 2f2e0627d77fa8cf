"""`retro demo` / `make demo`: the whole pipeline on the embedded defaults, on a local Ray.

Builds the database from the packaged Wikipedia summaries, trains a small RETRO and the same-size
decoder-only baseline on the same sequences (2 DDP workers each), evaluates both (valid bits-per-byte
with retrieval, retrieval off, baseline), prints the comparison, writes the loss curves, and generates a
completion with live retrieval, printing the neighbours it read.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import ray

from retro_platform.compare import compare_experiment
from retro_platform.config import PlatformConfig
from retro_platform.db.build import build_database
from retro_platform.evaluate import run_evaluation
from retro_platform.generation import complete
from retro_platform.ray_utils import init_ray
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


def run_demo(config: PlatformConfig, prompt: str = DEMO_PROMPT) -> dict:
    """Run the demo -> {'rows': comparison rows, 'completion': text}."""
    t0 = time.perf_counter()
    started = init_ray(config)
    pool = None
    try:
        print(f"[1/5] building the retrieval database in {config.db_path}")
        manifest = build_database(config)
        counts = manifest["counts"]
        print(
            f"      {sum(counts['documents'].values())} documents, {sum(counts['chunks'].values())} chunks, "
            f"index {manifest['index']['factory']} in {len(manifest['index']['shards'])} shards"
        )
        pool = NeighborPool.start(config, manifest)
        comparison = f"{config.train.name}-{manifest['db_id']}"
        trained = {}
        for step, kind in ((2, "retro"), (3, "baseline")):
            run_config = variant(config, kind, comparison)
            print(
                f"[{step}/5] training {kind} ({config.train.num_workers} DDP workers, {config.train.steps} steps)"
            )
            trained[kind] = run_training(run_config, pool=pool if kind == "retro" else None)
            run_evaluation(run_config, checkpoint=trained[kind]["checkpoint"], pool=pool)
        print("[4/5] comparison (valid bits per byte; lower is better)\n")
        rows = compare_experiment(config, comparison=comparison)
        print(f"\n[5/5] generation with live retrieval\nprompt: {prompt!r}")
        from retro_model.checkpoint import load_model_dir

        model, _ = load_model_dir(trained["retro"]["checkpoint"])
        text, used = complete(config, model, pool, prompt)
        print(f"completion: {text!r}")
        for chunk_text, ids, scores in used:
            print(
                f"  chunk {chunk_text[:50]!r}... read neighbours {ids} (scores {[round(s, 3) for s in scores]})"
            )
        print(
            f"\ndone in {time.perf_counter() - t0:.0f}s. MLflow store: {config.tracking_uri}\n"
            f"open the UI: mlflow ui --backend-store-uri {config.tracking_uri} --host 127.0.0.1 --port 5000"
        )
        return {"rows": rows, "completion": text}
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
