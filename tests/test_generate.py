"""Generation: cached decoding equals full recomputation; retrieval is called once per completed chunk."""

import pytest
import torch
from conftest import randomise_position_biases

from retro_model import RetroConfig
from retro_model.checkpoint import load_checkpoint, load_model_dir, save_checkpoint, save_model_dir
from retro_model.config import CROSS_POSITIONS
from retro_model.generate import BatchGenerator, generate, sample_next
from retro_model.model import Retro

M = 8


def make(retrieval=True, init_std=0.02, **overrides) -> Retro:
    torch.manual_seed(0)
    cfg = RetroConfig(
        init_std=init_std,
        vocab_size=40,
        d_model=32,
        n_heads=2,
        n_layers=3,
        cca_layers=(2, 3),
        enc_layers=1,
        chunk_len=M,
        max_seq_len=128,
        retrieval=retrieval,
        **overrides,
    )
    model = Retro(cfg).eval()
    randomise_position_biases(model)
    return model


class Retriever:
    """Deterministic neighbours derived from the chunk's tokens; records its calls."""

    def __init__(self, cfg: RetroConfig):
        self.cfg = cfg
        self.calls: list[list[int]] = []

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.calls.append(chunk.tolist())
        g = torch.Generator().manual_seed(int(chunk.sum()))
        return torch.randint(
            1, self.cfg.vocab_size, (self.cfg.num_neighbors, self.cfg.retrieved_len), generator=g
        )


@pytest.mark.parametrize("cross_positions", CROSS_POSITIONS)
def test_cached_greedy_equals_uncached(cross_positions):
    model = make(cross_positions=cross_positions)
    prompt = torch.randint(1, 40, (11,), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 40, retrieve=Retriever(model.config), use_cache=True)
    uncached = generate(model, prompt, 40, retrieve=Retriever(model.config), use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert len(cached) == 51


@pytest.mark.parametrize("cross_positions", CROSS_POSITIONS)
def test_incremental_logits_match_full_forward(cross_positions):
    model = make(cross_positions=cross_positions)
    cfg = model.config
    tokens = torch.randint(1, 40, (1, 3 * M + 5))
    nbrs = torch.randint(1, 40, (1, 3, cfg.num_neighbors, cfg.retrieved_len))
    full, _ = model(tokens, nbrs)
    cache = model.new_cache()
    neighbors = {u: nbrs[:, u] for u in range(3)}
    pieces = [model.forward_incremental(tokens[:, :10], cache, neighbors)]
    for i in range(10, tokens.shape[1]):
        pieces.append(model.forward_incremental(tokens[:, i : i + 1], cache, neighbors))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_retrieve_called_once_per_completed_chunk_with_its_tokens():
    model = make()
    retriever = Retriever(model.config)
    prompt = torch.arange(1, 6)
    out = generate(model, prompt, 3 * M, retrieve=retriever)
    completed = (len(out) - 1) // M  # chunks completed before the last token was sampled
    assert len(retriever.calls) == completed
    for u, call in enumerate(retriever.calls):
        assert call == out[u * M : (u + 1) * M].tolist()


def test_neighbors_change_generation_and_baseline_generates():
    model = make(init_std=0.3)  # an untrained model at std 0.02 greedily repeats one token whatever it reads
    prompt = torch.randint(1, 40, (M,), generator=torch.Generator().manual_seed(5))

    def fixed(value):
        return lambda chunk: torch.full((model.config.num_neighbors, model.config.retrieved_len), value)

    a = generate(model, prompt, 3 * M, retrieve=fixed(3))
    b = generate(model, prompt, 3 * M, retrieve=fixed(17))
    assert a.tolist() != b.tolist()
    base = generate(make(retrieval=False), prompt, 10)
    assert len(base) == M + 10


def test_sampling_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 2, None, g)[0]) for _ in range(50)}
    assert picks <= {1, 2} and len(picks) == 2
    assert int(sample_next(logits, 0.0, None, None)[0]) == 1
    picks = {int(sample_next(logits, 1.0, None, 0.5, g)[0]) for _ in range(50)}
    assert picks == {1}


def test_checkpoint_round_trip_identical_logits(tmp_path):
    model = make()
    tokens = torch.randint(1, 40, (2, 2 * M))
    nbrs = torch.randint(1, 40, (2, 2, 2, 2 * M))
    save_checkpoint(tmp_path / "m.safetensors", model, extra={"step": 7})
    loaded, extra = load_checkpoint(tmp_path / "m.safetensors")
    assert extra == {"step": 7} and loaded.config == model.config
    torch.testing.assert_close(loaded(tokens, nbrs)[0], model(tokens, nbrs)[0], atol=0, rtol=0)
    save_model_dir(tmp_path / "dir", make(retrieval=False))
    baseline, _ = load_model_dir(tmp_path / "dir")
    assert not baseline.config.retrieval


def test_checkpoint_from_before_later_fields_keeps_their_old_behaviour(tmp_path):
    """A checkpoint whose config lacks fields added later (``activation``: the MLP used the tanh GELU;
    ``cross_positions``: the cross-attentions had no positions) loads with the values naming that old
    behaviour and reproduces the logits it was saved with."""
    import json

    from safetensors.torch import load_file, save_file

    model = make(activation="gelu_tanh", cross_positions="none")
    tokens = torch.randint(1, 40, (2, 2 * M))
    nbrs = torch.randint(1, 40, (2, 2, 2, 2 * M))
    path = save_checkpoint(tmp_path / "new.safetensors", model)
    old_config = model.config.to_dict()
    del old_config["activation"], old_config["cross_positions"]
    save_file(
        load_file(str(path)),
        str(tmp_path / "old.safetensors"),
        metadata={"retro_config": json.dumps(old_config)},
    )
    loaded, _ = load_checkpoint(tmp_path / "old.safetensors")
    assert (loaded.config.activation, loaded.config.cross_positions) == ("gelu_tanh", "none")
    torch.testing.assert_close(loaded(tokens, nbrs)[0], model(tokens, nbrs)[0], atol=0, rtol=0)
    exact = make(activation="gelu", cross_positions="none")
    exact.load_state_dict(model.state_dict())
    assert not torch.equal(exact(tokens, nbrs)[0], model(tokens, nbrs)[0])  # the activation matters
    relative = make(activation="gelu_tanh", cross_positions="relative")
    missing, _ = relative.load_state_dict(model.state_dict(), strict=False)
    assert missing and all(name.endswith(("rel_bias", "key_shift")) for name in missing)  # its weights


def test_checkpoint_errors_are_clear(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model_dir(tmp_path)


def test_decoder_layer_is_the_block_of_both_paths():
    """``Retro.forward`` and ``forward_incremental`` run the same ``DecoderLayer.forward``: a layer
    changed in place changes both the same way."""
    model = make(retrieval=False)
    tokens = torch.randint(1, 40, (1, 2 * M + 3))
    with torch.no_grad():
        model.layers[1].ff.down.weight.mul_(3.0)
    full, _ = model(tokens)
    cache = model.new_cache()
    steps = [model.forward_incremental(tokens[:, :5], cache)]
    steps += [model.forward_incremental(tokens[:, i : i + 1], cache) for i in range(5, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    layer = model.layers[0]
    h = torch.randn(2, 4, 32)
    expected = h + layer.attn(layer.norm_attn(h), model.cos[:4], model.sin[:4], causal=True)
    expected = expected + layer.ff(layer.norm_ff(expected))
    torch.testing.assert_close(layer(h, model.cos[:4], model.sin[:4]), expected, atol=1e-6, rtol=1e-5)


def row_neighbors(cfg: RetroConfig, seq: int, kind: str) -> dict[int, torch.Tensor]:
    """Neighbours [k, r] of the chunks of sequence ``seq``: "real" for every chunk, "padded" with the
    last neighbour and the first one's continuation padding, "even" for even chunks only."""
    g = torch.Generator().manual_seed(100 + seq)
    out = {}
    for u in range(cfg.max_seq_len // cfg.chunk_len):
        nbrs = torch.randint(1, cfg.vocab_size, (cfg.num_neighbors, cfg.retrieved_len), generator=g)
        if kind == "padded":
            nbrs[-1] = cfg.pad_id
            nbrs[0, cfg.chunk_len :] = cfg.pad_id
        if kind != "even" or u % 2 == 0:
            out[u] = nbrs
    return out


@pytest.mark.parametrize("cross_positions", CROSS_POSITIONS)
def test_decode_step_gives_each_row_its_logits_alone(cross_positions):
    """Rows of different lengths stepped together by ``decode_step`` get the logits
    ``forward_incremental`` gives each sequence alone (atol 1e-4, fp32): rows complete chunks at
    different steps; one reads no neighbours, one padded neighbours, one those of even chunks only;
    one joins late, one leaves, and one joins in the row the moved row left."""
    model = make(init_std=0.3, cross_positions=cross_positions)
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    batch = model.new_batch()
    seqs = []  # per sequence: its own cache (the reference) and its neighbours (None: no retrieval)

    def join(length: int, neighbors: dict | None) -> None:
        prompt = torch.randint(1, 40, (1, length), generator=g)
        given = None if neighbors is None else {u: x[None] for u, x in neighbors.items()}
        batch_cache, own_cache = model.new_cache(), model.new_cache()
        first = model.forward_incremental(prompt, batch_cache, given)
        torch.testing.assert_close(model.forward_incremental(prompt, own_cache, given), first)
        assert batch.add(batch_cache) == len(batch) - 1
        seqs.append({"cache": own_cache, "neighbors": neighbors})

    for seq, (length, kind) in enumerate([(1, "real"), (6, None), (7, "padded"), (8, "even"), (15, "real")]):
        join(length, None if kind is None else row_neighbors(cfg, seq, kind))
    order = list(range(len(seqs)))  # sequence of each batch row
    for step in range(2 * M + 3):
        if step in (5, 12):  # at 12 into the row that step 10's move left (its stores hold that row's)
            join(3 if step == 5 else 2, row_neighbors(cfg, step, "real"))
            order.append(len(seqs) - 1)
        if step == 10:
            batch.remove(1)  # the last row moves into row 1
            order[1] = order.pop()
        tokens = torch.randint(1, 40, (len(order),), generator=g)
        nbrs = [seqs[s]["neighbors"] for s in order]
        logits = model.decode_step(tokens, batch, nbrs)
        for row, s in enumerate(order):
            given = seqs[s]["neighbors"]
            given = None if given is None else {u: x[None] for u, x in given.items()}
            alone = model.forward_incremental(tokens[row].view(1, 1), seqs[s]["cache"], given)[0, -1]
            torch.testing.assert_close(logits[row], alone, atol=1e-4, rtol=0, msg=f"step {step} row {row}")
        assert batch.lengths == [seqs[s]["cache"].length for s in order]
    assert sorted(batch.lengths) == [2 + 7, 3 + 14, 1 + 19, 7 + 19, 8 + 19, 15 + 19]  # crossed 1-3 chunks


class ManyRetriever:
    """``retrieve_many`` over ``Retriever``: records the (handles, chunks) of each call."""

    def __init__(self, cfg: RetroConfig):
        self.one = Retriever(cfg)
        self.calls: list[list[tuple[int, list[int]]]] = []

    def __call__(self, handles, chunks):
        self.calls.append([(h, c.tolist()) for h, c in zip(handles, chunks, strict=True)])
        return [self.one(c) for c in chunks]


def test_batch_generator_greedy_equals_generate_alone():
    """Four prompts of different lengths (one added two steps late) generate together what each
    generates alone; retrieve_many is called once per step at most, with each completed chunk once."""
    model = make(init_std=0.3)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 40, (n,), generator=g) for n in (3, 8, 13, 21)]
    budgets = [20, 9, 30, 17]
    retriever = ManyRetriever(model.config)
    gen = BatchGenerator(model, retrieve_many=retriever)
    handles = [gen.add(p, n) for p, n in zip(prompts[:3], budgets[:3], strict=True)]
    streamed = {h: [] for h in handles}
    steps = 0
    while len(gen):
        if steps == 2:
            handles.append(gen.add(prompts[3], budgets[3]))
            streamed[handles[3]] = []
        for handle, ids in gen.step().items():
            streamed[handle] += ids
        steps += 1
    assert len(retriever.calls) <= steps
    for handle, prompt, budget in zip(handles, prompts, budgets, strict=True):
        alone = generate(model, prompt, budget, retrieve=Retriever(model.config))
        assert gen.output(handle).tolist() == alone.tolist()
        assert streamed[handle] == gen.new_tokens(handle) == alone[len(prompt) :].tolist()
        assert gen.finished(handle) and gen.finish_reason(handle) == "length"
        out = alone.tolist()
        mine = [chunk for call in retriever.calls for h, chunk in call if h == handle]
        assert mine == [out[u * M : (u + 1) * M] for u in range((len(out) - 1) // M)]
    assert len(set(gen.new_tokens(handles[2]))) > 3  # not one repeated token: the test sees the model


def test_batch_generator_samples_each_row_with_its_own_settings_and_stops_it():
    """Per-row temperature/top-k/top-p/seed equal ``generate`` with the same settings; a row stops at
    its end token, another is removed mid-way, a retrieval-off model batches too."""
    model = make(init_std=0.3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 40, (n,), generator=g) for n in (4, 9, 17)]
    settings = [
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3),
    ]
    gen = BatchGenerator(model, retrieve_many=ManyRetriever(model.config))
    handles = [gen.add(p, 25, seed=i, **s) for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
    greedy = generate(model, prompts[0], 25, retrieve=Retriever(model.config))
    eos = greedy[len(prompts[0]) + 6].item()  # the greedy row's 7th new token ends it
    stopped = gen.add(prompts[0], 25, eos_id=eos)
    removed = gen.add(prompts[1], 25)
    for _ in range(5):
        with torch.inference_mode():  # as a server steps
            gen.step()
    assert len(gen.new_tokens(removed)) == 5 and not gen.finished(removed)
    gen.remove(removed)  # stops it (outside inference mode): the others go on
    assert removed not in gen.run()
    for i, (handle, prompt, s) in enumerate(zip(handles, prompts, settings, strict=True)):
        seeded = torch.Generator().manual_seed(i)
        alone = generate(model, prompt, 25, retrieve=Retriever(model.config), generator=seeded, **s)
        assert gen.output(handle).tolist() == alone.tolist()
    first_eos = greedy[len(prompts[0]) :].tolist().index(eos)
    assert gen.output(stopped).tolist() == greedy[: len(prompts[0]) + first_eos + 1].tolist()
    assert gen.finish_reason(stopped) == "eos"

    baseline = make(retrieval=False, init_std=0.3)
    gen = BatchGenerator(baseline)
    handles = [gen.add(p, 12) for p in prompts]
    outputs = gen.run()
    for handle, prompt in zip(handles, prompts, strict=True):
        assert outputs[handle].tolist() == generate(baseline, prompt, 12).tolist()


def test_batch_generator_retries_a_step_whose_retrieval_failed():
    """A step whose ``retrieve_many`` raises changes nothing: the next step redoes it, and the tokens
    are still those of ``generate``."""
    model = make(init_std=0.3)
    prompts = [torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 10)]
    retriever = ManyRetriever(model.config)
    failures = iter([True, False, False, True])  # the first fails the prefill step

    def flaky(handles, chunks):
        if next(failures, False):
            raise ConnectionError("pool unavailable")
        return retriever(handles, chunks)

    gen = BatchGenerator(model, retrieve_many=flaky)
    handles = [gen.add(p, 2 * M) for p in prompts]
    failed = 0
    while len(gen):
        try:
            gen.step()
        except ConnectionError:
            failed += 1
    assert failed == 2
    for handle, prompt in zip(handles, prompts, strict=True):
        assert (
            gen.output(handle).tolist()
            == generate(model, prompt, 2 * M, retrieve=Retriever(model.config)).tolist()
        )
