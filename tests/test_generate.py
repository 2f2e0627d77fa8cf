"""Generation: cached decoding equals full recomputation; retrieval is called once per completed chunk."""

import pytest
import torch
from conftest import randomise_position_biases

from retro_model import RetroConfig
from retro_model.checkpoint import load_checkpoint, load_model_dir, save_checkpoint, save_model_dir
from retro_model.config import CROSS_POSITIONS
from retro_model.generate import generate, sample_next
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
