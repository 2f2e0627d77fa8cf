"""`retro eval`: valid loss and bits-per-byte of a checkpoint, with retrieval and with retrieval off.

The checkpoint must match the database (chunk length, vocabulary, tokenizer); neighbours come from the
source ``train.neighbor_mode`` names (the live pool, or the precomputed table). Metrics are logged as
``eval_*`` into the training run the checkpoint came from, or into a new ``eval`` run when that run is
not in the configured tracking store.

The same losses are also reported per overlap bucket (``retro_platform.overlap``, the RETRO paper's
figure 6): every chunk that reads neighbours is put in a bucket by the fraction of its tokens that its
retrieved neighbours already contain, and each bucket gets its token and chunk counts and its loss and
bits-per-byte with retrieval and with retrieval off (the same chunks, neighbours removed). The baseline
gets the same buckets from the same database neighbours, which it never reads (retrieval off only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from retro_platform import tracking
from retro_platform.checkpoints import load_compatible_model, resolve_checkpoint
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.overlap import OverlapTotals
from retro_platform.ray_utils import ray_session
from retro_platform.serve.pool import NeighborPool
from retro_platform.train.data import SequenceSource, evaluation_batches, token_byte_lengths
from retro_platform.train.step import evaluate_model

logger = logging.getLogger(__name__)


def run_evaluation(
    config: PlatformConfig,
    checkpoint: str | Path | None = None,
    pool: NeighborPool | None = None,
    by_overlap: bool = True,
) -> dict[str, float]:
    """Evaluate a checkpoint on the valid split -> metrics (``valid_{loss,bpb}_{retrieval,no_retrieval}``).

    With ``by_overlap`` also ``valid_{tokens,chunks}_overlap_<bucket>`` and
    ``valid_{loss,bpb}_{retrieval,no_retrieval}_overlap_<bucket>`` (buckets in
    ``retro_platform.overlap.BUCKETS``). Also logged to MLflow as ``eval_*``. ``pool`` reuses a running
    NeighborPool for online neighbours.
    """
    with ray_session(config) as session:
        manifest = validate_database(config.db_path)
        path = resolve_checkpoint(config, checkpoint)
        model, extra = load_compatible_model(config, path, manifest)
        store = ChunkStore(config.db_path, manifest)
        token_bytes = token_byte_lengths(load_tokenizer_file(store.layout.tokenizer))
        source = SequenceSource(store, "valid", config.train.seq_len, model.config.num_neighbors, token_bytes)
        batches = evaluation_batches(source, config.train.batch_size, config.train.eval_batches)
        mode = config.train.neighbor_mode if model.config.retrieval or by_overlap else None
        has_table = bool(manifest.neighbors.get("valid"))
        if by_overlap and not model.config.retrieval and mode == "precomputed" and not has_table:
            logger.warning(
                "no precomputed neighbours for the valid split of %s: the baseline is evaluated without "
                "overlap buckets (run `retro query-neighbors` or set train.neighbor_mode=online)",
                config.db_path,
            )
            by_overlap, mode = False, None
        if mode == "online" and pool is None:
            pool = session.start_pool(manifest)
        totals = OverlapTotals(store.chunk_len, source.pad, token_bytes) if by_overlap else None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        amp = config.train.amp == "bf16" or (config.train.amp == "auto" and device.type == "cuda")
        metrics = evaluate_model(
            model.to(device),
            source,
            batches,
            pool,
            mode,
            device,
            amp,
            per_token=None if totals is None else totals.observe,
        )
        logger.info("evaluation of %s: %s", path, {k: round(v, 4) for k, v in metrics.items()})
        if totals is not None:
            metrics.update(totals.metrics())
            logger.info("losses by overlap with the retrieved neighbours:\n%s", totals.table())
        logged = {f"eval_{k}": v for k, v in metrics.items()}
        run_id = extra.get("run_id")
        if tracking.run_exists(config, run_id):
            tracking.log_metrics_to_run(config, run_id, logged)
        else:
            with tracking.start_run(config, stage="eval") as run:
                tracking.log_metrics(logged)
                tracking.set_tags({"checkpoint": str(path), "db_id": manifest.db_id})
                logger.info(
                    "checkpoint's training run not in %s: logged to run %s",
                    config.tracking_uri,
                    run.info.run_id,
                )
        return metrics
