"""The neighbour pool at run time: FAISS shards held by Ray actors (``pool.NeighborPool``, ``shard.ShardActor``)."""
