"""Neighbour service at run time: FAISS shards held by Ray actors."""
