"""Sampling from a Retro model with retrieval every chunk and a KV cache.

``generate`` feeds the prompt, then one token at a time. Whenever a chunk of ``chunk_len`` tokens
completes, ``retrieve(chunk_tokens)`` is called for that chunk's neighbours, which the following tokens
attend to. Self-attention keys/values and the encoded neighbours of every chunk are cached, so each new
token costs one decoder step. ``use_cache=False`` recomputes the whole sequence every step (the
reference the cached path must match).

``BatchGenerator`` does the same for many sequences at once, as a server needs: sequences join at any
step (their prompts prefilled one by one), every step advances all of them by one token in one batched
forward pass (``Retro.decode_step``), one ``retrieve_many`` call fetches the neighbours of every chunk
the sequences complete at that step, and each sequence samples with its own settings and generator and
stops at its own length or end token. Each sequence's tokens are those ``generate`` gives it alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from retro_model.model import DecodeBatch, Retro

Retriever = Callable[[Tensor], Tensor]
"""chunk tokens [m] -> neighbour tokens [k, r]."""

RetrieveMany = Callable[[list[int], list[Tensor]], list[Tensor]]
"""(handles of the sequences, the chunks they completed: tokens [m] each) -> neighbour tokens [k, r]
per chunk. A sequence may have several chunks in one call (its prompt's)."""


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None
) -> Tensor:
    """Pick the next token from logits [b, V] -> [b]: greedy at temperature 0, else top-k/top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def prompt_tokens(prompt: Tensor, max_new_tokens: int, config) -> list[int]:
    """The token ids of ``prompt`` [n]; refuses an empty prompt and one that ``max_new_tokens`` would
    carry past the model's ``max_seq_len``."""
    tokens = prompt.reshape(-1).tolist()
    if not tokens:
        raise ValueError("generation needs a prompt of at least one token")
    if len(tokens) + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds model max_seq_len {config.max_seq_len}"
        )
    return tokens


@torch.no_grad()
def generate(
    model: Retro,
    prompt: Tensor,
    max_new_tokens: int,
    retrieve: Retriever | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt`` [n] (one sequence) by up to ``max_new_tokens`` tokens -> all tokens [n + new].

    ``retrieve`` is called once per completed chunk (in the prompt and in the generated text); None
    generates with retrieval off.
    """
    model.eval()
    cfg = model.config
    m = cfg.chunk_len
    tokens = prompt_tokens(prompt, max_new_tokens, cfg)
    device = next(model.parameters()).device
    neighbors: dict[int, Tensor] = {}  # chunk index -> [1, k, r]

    def retrieve_completed(upto: int) -> None:
        """Retrieve neighbours for every chunk completed within tokens[:upto]."""
        if retrieve is None or not cfg.retrieval:
            return
        for u in range(upto // m):
            if u not in neighbors:
                chunk = torch.tensor(tokens[u * m : (u + 1) * m], device=device)
                neighbors[u] = retrieve(chunk).to(device).unsqueeze(0)

    cache = model.new_cache() if use_cache else None
    fed = 0  # tokens already in the cache
    for _ in range(max_new_tokens):
        retrieve_completed(len(tokens))
        if use_cache:
            new = torch.tensor([tokens[fed:]], device=device)
            logits = model.forward_incremental(new, cache, neighbors)[:, -1]
            fed = len(tokens)
        else:
            seq = torch.tensor([tokens], device=device)
            nbrs = None
            if neighbors and cfg.retrieval:
                nbrs = torch.cat([neighbors[u] for u in range(len(tokens) // m)], 0).unsqueeze(0)
            logits = model(seq, nbrs)[0][:, -1]
        next_token = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        tokens.append(next_token)
        if eos_id is not None and next_token == eos_id:
            break
    return torch.tensor(tokens, dtype=torch.long)


@dataclass
class _Row:
    """One sequence of a ``BatchGenerator``."""

    tokens: list[int]
    """Prompt and generated tokens; the last generated one is not fed yet."""
    prompt_len: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    eos_id: int | None
    neighbors: dict[int, Tensor] = field(default_factory=dict)
    """chunk index -> neighbours [k, r] retrieved at this step, not yet fed."""
    finish_reason: str | None = None
    """None while generating; "length", "eos" or "removed"."""

    @property
    def new_tokens(self) -> list[int]:
        """The generated tokens."""
        return self.tokens[self.prompt_len :]


class BatchGenerator:
    """Generation of many sequences stepped together (what a server replica runs).

    ``add`` a prompt -> a handle; every ``step`` prefills the sequences added since the last step and
    advances every other unfinished sequence by one token, all of them in one ``Retro.decode_step``,
    and returns the new token of each; ``finished``, ``new_tokens`` and ``output`` read a sequence,
    ``remove`` forgets it (and stops it if unfinished). ``retrieve_many(handles, chunks)`` is called
    at most once per step, with every chunk completed since the last step (a new sequence's prompt
    chunks, and the chunk each other sequence's next token completes), so the caller can send one
    pool query for all of them. Greedy (and equally seeded) output of each sequence equals
    ``generate`` of that sequence alone with ``retrieve`` returning what ``retrieve_many`` does.
    """

    def __init__(self, model: Retro, retrieve_many: RetrieveMany | None = None, eos_id: int | None = None):
        """``retrieve_many``: None generates with retrieval off. ``eos_id``: the end token of every
        sequence that ``add`` gives none."""
        self.model = model.eval()
        self.retrieve_many = retrieve_many
        self.eos_id = eos_id
        self.batch: DecodeBatch = model.new_batch()
        self._rows: dict[int, _Row] = {}
        self._order: list[int] = []  # handle of each row of the batch
        self._waiting: list[int] = []  # added, prefilled at the next step
        self._next = 0
        self._device = next(model.parameters()).device

    def add(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
    ) -> int:
        """Queue ``prompt`` [n] to be continued by up to ``max_new_tokens`` tokens -> its handle.

        Sampling as in ``generate``: greedy at temperature 0, else top-k/top-p with ``generator`` (or a
        new one seeded with ``seed``). ``eos_id``: this sequence's end token (default: the generator's).
        It is prefilled at the next ``step``.
        """
        tokens = prompt_tokens(prompt, max_new_tokens, self.model.config)
        if generator is not None and seed is not None:
            raise ValueError("give a generator or a seed, not both")
        if seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(seed)
        handle, self._next = self._next, self._next + 1
        row = _Row(
            tokens=tokens,
            prompt_len=len(tokens),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_id=self.eos_id if eos_id is None else eos_id,
        )
        self._rows[handle] = row
        if max_new_tokens <= 0:
            row.finish_reason = "length"
        else:
            self._waiting.append(handle)
        return handle

    def __len__(self) -> int:
        """Unfinished sequences (generating or waiting for their prefill)."""
        return len(self._order) + len(self._waiting)

    def finished(self, handle: int) -> bool:
        """Whether a sequence reached its max_new_tokens or its end token (or was removed)."""
        return self._rows[handle].finish_reason is not None

    def finish_reason(self, handle: int) -> str | None:
        """None while generating; "length", "eos", or "removed"."""
        return self._rows[handle].finish_reason

    def new_tokens(self, handle: int) -> list[int]:
        """The tokens generated for a sequence so far."""
        return list(self._rows[handle].new_tokens)

    def output(self, handle: int) -> Tensor:
        """Prompt and generated tokens of a sequence [n + new] (what ``generate`` returns)."""
        return torch.tensor(self._rows[handle].tokens, dtype=torch.long)

    def remove(self, handle: int) -> None:
        """Forget a sequence, stopping it if it is unfinished (unknown handles are ignored)."""
        row = self._rows.pop(handle, None)
        if row is None:
            return
        if row.finish_reason is None:
            row.finish_reason = "removed"
        if handle in self._waiting:
            self._waiting.remove(handle)
        if handle in self._order:
            self._drop(self._order.index(handle))

    def _drop(self, index: int) -> None:
        """Take row ``index`` out of the batch (the last row moves into its place)."""
        self.batch.remove(index)
        self._order[index] = self._order[-1]
        self._order.pop()

    @torch.inference_mode()
    def step(self) -> dict[int, list[int]]:
        """Advance every unfinished sequence by one token -> {handle: [new token]}.

        Sequences added since the last step are prefilled (their first token comes from their prompt);
        the others are fed their last token together in one ``decode_step``. A sequence that reaches its
        max_new_tokens or samples its end token is finished (its last token is never fed).
        """
        cfg = self.model.config
        m = cfg.chunk_len
        waiting = list(self._waiting)  # each leaves the queue once prefilled (kept if the step fails)
        if self.retrieve_many is not None and cfg.retrieval:
            wanted = [(handle, u) for handle in waiting for u in range(len(self._rows[handle].tokens) // m)]
            for handle in self._order:
                position = len(self._rows[handle].tokens) - 1  # of the token fed at this step
                if (position + 1) % m == 0:
                    wanted.append((handle, position // m))
            if wanted:
                chunks = [
                    torch.tensor(self._rows[handle].tokens[u * m : (u + 1) * m], device=self._device)
                    for handle, u in wanted
                ]
                found = self.retrieve_many([handle for handle, _ in wanted], chunks)
                if len(found) != len(wanted):
                    raise ValueError(
                        f"retrieve_many returned {len(found)} neighbour sets for {len(wanted)} chunks"
                    )
                for (handle, u), nbrs in zip(wanted, found, strict=True):
                    self._rows[handle].neighbors[u] = nbrs.to(self._device)
        produced: dict[int, list[int]] = {}
        if self._order:
            rows = [self._rows[handle] for handle in self._order]
            tokens = torch.tensor([row.tokens[-1] for row in rows], device=self._device)
            logits = self.model.decode_step(tokens, self.batch, [row.neighbors for row in rows])
            for handle, row, token in zip(self._order, rows, self._sample(logits, rows), strict=True):
                row.neighbors = {}
                produced[handle] = [self._append(row, token)]
        for handle in waiting:
            row = self._rows[handle]
            cache = self.model.new_cache()
            prompt = torch.tensor([row.tokens], device=self._device)
            neighbors = {u: nbrs.unsqueeze(0) for u, nbrs in row.neighbors.items()}
            logits = self.model.forward_incremental(prompt, cache, neighbors)[:, -1]
            row.neighbors = {}
            self._waiting.remove(handle)
            produced[handle] = [self._append(row, self._sample(logits, [row])[0])]
            if row.finish_reason is None:
                self.batch.add(cache)
                self._order.append(handle)
        for index in reversed(range(len(self._order))):
            if self._rows[self._order[index]].finish_reason is not None:
                self._drop(index)
        return produced

    @staticmethod
    def _sample(logits: Tensor, rows: list[_Row]) -> list[int]:
        """The next token of each row from logits [b, V], with the row's own sampling settings."""
        picks = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.temperature > 0:
                picks[i] = int(
                    sample_next(logits[i : i + 1], row.temperature, row.top_k, row.top_p, row.generator)[0]
                )
        return picks

    @staticmethod
    def _append(row: _Row, token: int) -> int:
        """Record a sampled token; finish the row at its length or end token."""
        row.tokens.append(token)
        if row.eos_id is not None and token == row.eos_id:
            row.finish_reason = "eos"
        elif len(row.tokens) - row.prompt_len >= row.max_new_tokens:
            row.finish_reason = "length"
        return token

    def run(self) -> dict[int, Tensor]:
        """Step until every sequence is finished -> {handle: prompt and generated tokens}."""
        while len(self):
            self.step()
        return {handle: self.output(handle) for handle in self._rows}
