"""The generation engine of a served replica: concurrent requests stepped together, retrieval per chunk.

A request becomes a ``Row``: its prompt ids, sampling settings, a seeded generator and an asyncio queue
of events. One loop per replica (``Engine.run``) admits waiting rows (up to ``max_batch_size`` active),
asks the pool once per step for the neighbours of every chunk that rows completed (one embedding call
and one pool query for all of them), advances every active row by one token in one batched forward
pass (``retro_model.generate.BatchGenerator``), and puts each row's new text on its queue. The forward
pass runs in a worker thread, so the replica keeps answering health checks and new requests meanwhile.

Greedy completions equal `retro generate`'s for the same prompt (the same per-chunk retrieval, the same
aligned neighbour windows, the same model), whatever else the replica is generating at the time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from retro_model.generate import BatchGenerator

logger = logging.getLogger(__name__)

NeighbourLookup = Callable[[list[torch.Tensor]], list[tuple[torch.Tensor, dict[str, Any]]]]
"""chunk token tensors [m] -> per chunk (neighbour tokens [k, r], what was read: ids, scores, texts)."""


@dataclass
class Row:
    """One request being generated."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    chunks: list[dict[str, Any]] = field(default_factory=list)
    """Per retrieving chunk: its text and the neighbours read."""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    retrieval_s: float = 0.0
    """Seconds this row waited for neighbour lookups (each shared with the rows of the same step)."""
    handle: int | None = None
    """The row's id in the BatchGenerator."""


class Engine:
    """Steps the active rows of one replica together (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        lookup: NeighbourLookup | None,
        max_batch_size: int,
        eos_id: int | None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.lookup = lookup
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id
        self.waiting: asyncio.Queue[Row] = asyncio.Queue()
        self.active: list[Row] = []
        self.steps = 0
        self.batched_rows = 0
        self._task: asyncio.Task | None = None
        self.generator = BatchGenerator(model, retrieve_many=self._retrieve_many, eos_id=eos_id)
        self._read: dict[int, list[dict[str, Any]]] = {}
        self._lookup_s = 0.0

    def submit(self, row: Row) -> None:
        """Queue a row; the loop admits it at its next step."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())
        self.waiting.put_nowait(row)

    def _retrieve_many(self, handles: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The neighbours of the chunks rows completed (one lookup for all) -> tokens [k, r] each."""
        t0 = time.perf_counter()
        found = self.lookup(chunks)
        self._lookup_s = time.perf_counter() - t0
        for handle, chunk, (_, read) in zip(handles, chunks, found, strict=True):
            self._read.setdefault(handle, []).append({"chunk": self.tokenizer.decode(chunk.tolist()), **read})
        return [tokens for tokens, _ in found]

    def _admit(self) -> None:
        while len(self.active) < self.max_batch_size and not self.waiting.empty():
            row = self.waiting.get_nowait()
            generator = None
            if row.seed is not None:
                generator = torch.Generator().manual_seed(row.seed)
            row.handle = self.generator.add(
                torch.tensor(row.prompt_ids, dtype=torch.long),
                row.max_new_tokens,
                temperature=row.temperature,
                top_k=row.top_k,
                top_p=row.top_p,
                generator=generator,
            )
            self.active.append(row)

    def _step(self) -> dict[int, list[int]]:
        """One batched step of every active row -> new token ids per row handle (runs in a thread)."""
        with torch.inference_mode():
            return self.generator.step()

    async def run(self) -> None:
        """Admit, step, publish; until no row is active or waiting (the next submit starts it again)."""
        while True:
            self._admit()
            if not self.active:
                if self.waiting.empty():
                    return
                continue
            try:
                produced = await asyncio.to_thread(self._step)
            except Exception as exc:  # a failed step fails its rows, never the replica
                logger.exception("generation step failed")
                for row in self.active:
                    self.generator.remove(row.handle)
                    row.events.put_nowait({"error": f"generation failed: {exc}"})
                self.active = []
                continue
            self.steps += 1
            self.batched_rows += len(self.active)
            lookup_s, self._lookup_s = self._lookup_s, 0.0
            still = []
            for row in self.active:
                reads = self._read.pop(row.handle, [])
                if reads:
                    row.retrieval_s += lookup_s
                for read in reads:
                    row.chunks.append(read)
                    row.events.put_nowait({"chunk": read})
                ids = produced.get(row.handle, [])
                if ids:
                    if row.first_token_s is None:
                        row.first_token_s = time.perf_counter() - row.started
                    row.new_ids.extend(ids)
                    text = self.tokenizer.decode(row.new_ids)
                    delta, row.text = text[len(row.text) :], text
                    row.events.put_nowait({"token": delta, "ids": ids})
                if self.generator.finished(row.handle):
                    self.generator.remove(row.handle)
                    row.events.put_nowait({"done": True})
                else:
                    still.append(row)
            self.active = still
