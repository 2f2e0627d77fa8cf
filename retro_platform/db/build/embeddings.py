"""Stage 4 of the build: every chunk embedded by a pool of encoder actors that write the vectors.

A Ray Data actor pool (``database.embed.num_actors``, on GPUs when ``gpus_per_actor`` > 0, on the
``ray.embed_resource`` nodes when set) takes one shard per call: it reads the texts, embeds them row
group by row group and writes the shard's .npy; the driver only records the checksum it reports.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import ray

from retro_platform.config import PlatformConfig
from retro_platform.db.build.ledger import Ledger
from retro_platform.db.build.tasks import embed_resources
from retro_platform.db.embed import ShardEmbedder
from retro_platform.db.layout import SPLITS
from retro_platform.db.manifest import SplitShard

logger = logging.getLogger(__name__)


def embed_shards(
    config: PlatformConfig, items: list[dict[str, str]], encoder: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Run the encoder actor pool (sized and placed by ``database.embed``) over work items ``{chunks,
    out}`` (a shard's chunk store, its .npy) -> a row ``{out, sha256, rows}`` per shard as it is written.
    ``encoder``: ShardEmbedder's model, compute_dtype, batch_size and out_dtype."""
    embed = config.database.embed
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs=dict(
            **encoder, threads=embed.threads_per_actor or max(1, math.ceil(embed.cpus_per_actor))
        ),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(embed.num_actors, len(items))),
        num_cpus=embed.cpus_per_actor,
        num_gpus=embed.gpus_per_actor or None,
        resources=embed_resources(config),
    )
    return ds.iter_rows()


def write_embeddings(
    config: PlatformConfig, ledger: Ledger, plans: dict[str, list[SplitShard]]
) -> dict[str, float]:
    """Embed every shard whose vectors are not current -> the stage's timing stats."""
    layout = ledger.layout
    todo = [
        s
        for split in SPLITS
        for s in plans[split]
        if not ledger.is_current(layout.embeddings(split, s.shard), [layout.chunks(split, s.shard)])
    ]
    if not todo:
        logger.info("embeddings: all shards up to date")
        return {}
    embed = config.database.embed
    use_gpu = embed.gpus_per_actor > 0
    encoder = dict(
        model=embed.model,
        compute_dtype=embed.compute_dtype,
        batch_size=embed.gpu_batch_size if use_gpu else embed.batch_size,
        out_dtype=embed.dtype,
    )
    items = [
        {"chunks": str(layout.chunks(s.split, s.shard)), "out": str(layout.embeddings(s.split, s.shard))}
        for s in todo
    ]
    by_out = {item["out"]: s for item, s in zip(items, todo, strict=True)}
    t0 = time.perf_counter()
    total = 0
    for row in embed_shards(config, items, encoder):
        s = by_out[row["out"]]
        ledger.record(layout.embeddings(s.split, s.shard), [layout.chunks(s.split, s.shard)], row["sha256"])
        total += int(row["rows"])
    seconds = time.perf_counter() - t0
    logger.info("embeddings: %d chunks in %.1fs (%.0f chunks/s)", total, seconds, total / seconds)
    return {"embed_seconds": seconds, "chunks_per_second_embedding": total / seconds}
