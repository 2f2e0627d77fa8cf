"""The serving engine (``retro_platform.serve.engine``) on a tiny model, without Ray Serve: a row whose
client went away leaves the batch at the next step, and the engine goes on serving the others."""

from __future__ import annotations

import asyncio
import threading

import torch
from test_generate import M, Retriever, make

from retro_platform.serve.engine import Engine, Row


class DigitTokenizer:
    """Decodes ids as their numbers (the engine decodes completed chunks for the read neighbours)."""

    def decode(self, ids: list[int]) -> str:
        """Ids as space-separated numbers."""
        return " ".join(str(i) for i in ids)


class GatedLookup:
    """Deterministic neighbours per chunk; the call that would serve chunk ``gate_chunk`` of a row
    waits until ``release`` is set, so a test can act while that row is mid-generation."""

    def __init__(self, model, gate_calls: int):
        self.retriever = Retriever(model.config)
        self.calls = 0
        self.gate_calls = gate_calls
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, chunks: list[torch.Tensor]):
        self.calls += 1
        if self.calls == self.gate_calls:
            self.reached.set()
            assert self.release.wait(timeout=60), "the test never released the lookup"
        return [(self.retriever(chunk), {"neighbors": []}) for chunk in chunks]


def collect(row: Row, until_done: bool = True):
    """Every event of a row up to its end (``until_done``) or its first token event."""

    async def run():
        events = []
        while True:
            event = await row.events.get()
            events.append(event)
            if "done" in event or "error" in event or (not until_done and "ids" in event):
                return events

    return run()


def test_a_row_whose_client_went_away_leaves_the_batch_and_the_others_finish():
    model = make(retrieval=True)
    lookup = GatedLookup(model, gate_calls=2)  # the row's second completed chunk blocks the engine
    engine = Engine(model, DigitTokenizer(), lookup, max_batch_size=4, eos_id=None)
    prompt = list(range(1, M // 2 + 1))

    async def scenario():
        gone = Row(prompt_ids=prompt, max_new_tokens=100, temperature=0.0, top_k=None, top_p=None, seed=None)
        engine.submit(gone)
        await collect(gone, until_done=False)  # it generates
        await asyncio.to_thread(lookup.reached.wait, 60)
        gone.cancelled = True  # what the request side does when its client disconnects
        lookup.release.set()
        stays = Row(prompt_ids=prompt, max_new_tokens=20, temperature=0.0, top_k=None, top_p=None, seed=None)
        engine.submit(stays)
        events = await asyncio.wait_for(collect(stays), timeout=60)
        return gone, stays, events

    gone, stays, events = asyncio.run(scenario())
    assert engine.cancelled_rows == 1
    # the cancelled row stopped at the step that was running when its client left, far from its 100
    assert M // 2 <= len(gone.new_ids) <= 2 * M, gone.new_ids
    assert events[-1] == {"done": True} and len(stays.new_ids) == 20
    assert not engine.active


def test_a_row_cancelled_before_its_first_step_is_never_generated():
    model = make(retrieval=False)
    engine = Engine(model, DigitTokenizer(), None, max_batch_size=4, eos_id=None)
    prompt = list(range(1, 5))

    async def scenario():
        never = Row(prompt_ids=prompt, max_new_tokens=10, temperature=0.0, top_k=None, top_p=None, seed=None)
        never.cancelled = True
        engine.submit(never)
        after = Row(prompt_ids=prompt, max_new_tokens=10, temperature=0.0, top_k=None, top_p=None, seed=None)
        engine.submit(after)
        await asyncio.wait_for(collect(after), timeout=60)
        return never, after

    never, after = asyncio.run(scenario())
    assert never.new_ids == [] and never.handle is None and never.events.empty()
    assert len(after.new_ids) == 10 and engine.cancelled_rows == 1
