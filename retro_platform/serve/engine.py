"""The generation engine of a served replica: concurrent requests stepped together, retrieval per chunk.

A request becomes a ``Row``: its prompt ids, sampling settings, a seeded generator and an asyncio queue
of events. One loop per replica (``Engine.run``) admits waiting rows (up to ``max_batch_size`` active),
asks the pool once per step for the neighbours of every chunk that rows completed (one embedding call
and one pool query for all of them), advances every active row by one token in one batched forward
pass (``retro_model.generate.BatchGenerator``), and puts each row's new token ids on its queue
(the request side decodes them, once per stream interval, off the torch thread). The loop runs
on the replica's one torch thread, so the replica keeps answering health checks and new requests, and
relaying tokens, meanwhile.

Greedy completions equal `retro generate`'s for the same prompt (the same per-chunk retrieval, the same
aligned neighbour windows, the same model), whatever else the replica is generating at the time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from retro_model.generate import BatchGenerator

logger = logging.getLogger(__name__)

NO_TOKEN = -1
"""An end token no sequence produces (``ignore_eos``)."""

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
    ignore_eos: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    new_ids: list[int] = field(default_factory=list)
    """Generated ids (appended by the engine's thread)."""
    chunks: list[dict[str, Any]] = field(default_factory=list)
    """Per retrieving chunk: its text and the neighbours read."""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    retrieval_s: float = 0.0
    """Seconds this row waited for neighbour lookups (each shared with the rows of the same step)."""
    handle: int | None = None
    """The row's id in the BatchGenerator."""
    cancelled: bool = False
    """Set by the request side when its client went away: the engine drops the row at its next step."""


class Engine:
    """Steps the active rows of one replica together (see the module docstring).

    The stepping loop runs on one thread of its own (``executor``: the replica's torch thread), not on
    the event loop: requests arrive through a thread-safe inbox and events go back to each request's
    asyncio queue with ``call_soon_threadsafe``, so the next step never waits for the event loop to
    relay the previous one's tokens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        lookup: NeighbourLookup | None,
        max_batch_size: int,
        eos_id: int | None,
        executor: ThreadPoolExecutor | None = None,
    ):
        """``executor``: the single thread the loop runs on (None: one of its own)."""
        self.model = model
        self.tokenizer = tokenizer
        self.lookup = lookup
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="retro-engine")
        self.inbox: queue.SimpleQueue[tuple[Row, asyncio.AbstractEventLoop]] = queue.SimpleQueue()
        self.active: list[tuple[Row, asyncio.AbstractEventLoop]] = []
        self.steps = 0
        self.batched_rows = 0
        self.cancelled_rows = 0
        """Rows dropped because their client went away before the end."""
        self._lock = threading.Lock()
        self._running = False
        self.generator = BatchGenerator(model, retrieve_many=self._retrieve_many, eos_id=eos_id)
        self._read: dict[int, list[dict[str, Any]]] = {}
        self._lookup_s = 0.0

    def submit(self, row: Row) -> None:
        """Queue a row (from the event loop); the stepping loop admits it at its next step."""
        self.inbox.put((row, asyncio.get_running_loop()))
        with self._lock:
            if not self._running:
                self._running = True
                self.executor.submit(self.run)

    def _retrieve_many(self, handles: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The neighbours of the chunks rows completed (one lookup for all) -> tokens [k, r] each."""
        t0 = time.perf_counter()
        found = self.lookup(chunks)
        self._lookup_s = time.perf_counter() - t0
        for handle, chunk, (_, read) in zip(handles, chunks, found, strict=True):
            self._read.setdefault(handle, []).append({"chunk": self.tokenizer.decode(chunk.tolist()), **read})
        return [tokens for tokens, _ in found]

    def _admit(self) -> None:
        while len(self.active) < self.max_batch_size and not self.inbox.empty():
            row, loop = self.inbox.get()
            if row.cancelled:
                self.cancelled_rows += 1
                continue
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
                eos_id=NO_TOKEN if row.ignore_eos else None,
            )
            self.active.append((row, loop))

    @staticmethod
    def _deliver(items: list[tuple[Row, dict[str, Any]]]) -> None:
        """Put events on their rows' queues (runs on the rows' event loop)."""
        for row, event in items:
            row.events.put_nowait(event)

    def _publish(
        self, outbox: dict, row: Row, loop: asyncio.AbstractEventLoop, event: dict[str, Any]
    ) -> None:
        """Collect an event for the request's event loop (``_flush`` hands a step's events over at once)."""
        outbox.setdefault(loop, []).append((row, event))

    def _flush(self, outbox: dict) -> None:
        """Hand every collected event to its event loop: one wake-up per loop and step, not per row."""
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(self._deliver, items)

    def _drop_cancelled(self) -> None:
        """Stop the rows whose clients went away (they leave the batch before the next step)."""
        for row, _ in [entry for entry in self.active if entry[0].cancelled]:
            self.generator.remove(row.handle)
            self.cancelled_rows += 1
        self.active = [entry for entry in self.active if not entry[0].cancelled]

    def run(self) -> None:
        """Admit, step, publish (on the engine's thread); until no row is active or waiting (the next
        ``submit`` starts it again). Rows get token ids; the request side decodes them (off this thread)."""
        while True:
            self._drop_cancelled()
            self._admit()
            if not self.active:
                with self._lock:
                    if self.inbox.empty():
                        self._running = False
                        return
                continue
            outbox: dict = {}
            try:
                with torch.inference_mode():
                    produced = self.generator.step()
            except Exception as exc:  # a failed step fails its rows, never the replica
                logger.exception("generation step failed")
                for row, loop in self.active:
                    self.generator.remove(row.handle)
                    self._publish(outbox, row, loop, {"error": f"generation failed: {exc}"})
                self.active = []
                self._flush(outbox)
                continue
            self.steps += 1
            self.batched_rows += len(self.active)
            lookup_s, self._lookup_s = self._lookup_s, 0.0
            still = []
            for row, loop in self.active:
                reads = self._read.pop(row.handle, [])
                if reads:
                    row.retrieval_s += lookup_s
                for read in reads:
                    row.chunks.append(read)
                    self._publish(outbox, row, loop, {"chunk": read})
                ids = produced.get(row.handle, [])
                if ids:
                    if row.first_token_s is None:
                        row.first_token_s = time.perf_counter() - row.started
                    row.new_ids.extend(ids)
                    self._publish(outbox, row, loop, {"ids": ids})
                if self.generator.finished(row.handle):
                    self.generator.remove(row.handle)
                    self._publish(outbox, row, loop, {"done": True})
                else:
                    still.append((row, loop))
            self.active = still
            self._flush(outbox)
