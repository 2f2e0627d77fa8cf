"""Retrieval database build (Ray Data): corpus -> chunks -> embeddings -> sharded FAISS index."""
