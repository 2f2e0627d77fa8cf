"""Distributed training on Ray Train."""
