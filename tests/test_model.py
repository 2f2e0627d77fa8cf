"""Retro model: shapes, causality, retrieval effect, padding, training signal, baseline, config errors."""

import pytest
import torch
from conftest import randomise_position_biases

from retro_model import RetroConfig
from retro_model.config import CROSS_POSITIONS
from retro_model.model import Retro

M = 8  # chunk length of the tiny test models


def tiny_config(**overrides) -> RetroConfig:
    values = dict(
        vocab_size=50,
        d_model=32,
        n_heads=2,
        n_layers=3,
        cca_layers=(2, 3),
        enc_layers=2,
        chunk_len=M,
        num_neighbors=2,
        max_seq_len=128,
    )
    values.update(overrides)
    return RetroConfig(**values)


def random_inputs(
    cfg: RetroConfig, b: int, n: int, k: int | None = None, r: int | None = None, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    k = k or cfg.num_neighbors
    r = r or cfg.retrieved_len
    tokens = torch.randint(1, cfg.vocab_size, (b, n), generator=g)
    neighbors = torch.randint(1, cfg.vocab_size, (b, n // cfg.chunk_len, k, r), generator=g)
    return tokens, neighbors


def make_model(cfg: RetroConfig, seed: int = 0) -> Retro:
    torch.manual_seed(seed)
    return Retro(cfg).eval()


@pytest.mark.parametrize(
    "b,n,k,r",
    [(1, 8, 1, 16), (2, 24, 2, 16), (3, 29, 3, 10), (2, 5, 2, 16), (1, 64, 4, 8), (2, 17, 2, 16)],
)
def test_output_shapes(b, n, k, r):
    cfg = tiny_config(num_neighbors=k, neighbor_len=r)
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, b, n, k, r)
    logits, loss = model(tokens, neighbors, targets=tokens)
    assert logits.shape == (b, n, cfg.vocab_size)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("cross_positions", CROSS_POSITIONS)
def test_causal_in_tokens_and_neighbors_for_every_position(cross_positions):
    """Changing tokens after t, or neighbours t must not see, leaves logits at <= t unchanged."""
    cfg = tiny_config(cross_positions=cross_positions)
    model = make_model(cfg)
    randomise_position_biases(model)
    b, n = 2, 4 * M + 3  # several chunks and a partial last chunk
    tokens, neighbors = random_inputs(cfg, b, n)
    base, _ = model(tokens, neighbors)
    g = torch.Generator().manual_seed(1)
    for t in range(n - 1):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(1, cfg.vocab_size, (b, n - t - 1), generator=g)
        # neighbours of chunk u are visible from position (u+1)*M - 1: chunks with (u+1)*M - 1 > t are unseen
        changed_nbrs = neighbors.clone()
        first_unseen = max(0, (t + 1) // M)  # smallest u with (u+1)*M - 1 > t
        changed_nbrs[:, first_unseen:] = torch.randint(
            1, cfg.vocab_size, changed_nbrs[:, first_unseen:].shape, generator=g
        )
        out, _ = model(changed, changed_nbrs)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the change did reach the future


def test_neighbors_of_chunk_u_change_logits_of_chunk_u_plus_1():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, 1, 4 * M)
    base, _ = model(tokens, neighbors)
    for u in range(3):
        changed = neighbors.clone()
        changed[:, u] = torch.randint(1, cfg.vocab_size, changed[:, u].shape)
        out, _ = model(tokens, changed)
        window = slice((u + 1) * M - 1, (u + 2) * M - 1)
        assert (out[:, window] - base[:, window]).abs().max() > 1e-4
        # and nothing before the window moved
        torch.testing.assert_close(out[:, : (u + 1) * M - 1], base[:, : (u + 1) * M - 1], atol=1e-6, rtol=0)


def test_all_padding_neighbors_give_finite_outputs_and_equal_no_neighbor_attention():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, 2, 3 * M)
    neighbors[0] = cfg.pad_id  # every neighbour of sequence 0 is padding
    neighbors[1, 1, 0] = cfg.pad_id  # one neighbour of one chunk of sequence 1
    neighbors[1, 2, :, cfg.chunk_len :] = cfg.pad_id  # missing continuations
    logits, loss = model(tokens, neighbors, targets=tokens)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    # all-padding neighbours read only the null key/value: their content cannot matter
    other = neighbors.clone()
    other[0] = cfg.pad_id
    logits2, _ = model(tokens, other)
    torch.testing.assert_close(logits2[0], logits[0])


def test_padded_neighbor_tokens_are_ignored():
    """A padded neighbour slot gives the same output whatever its (masked) encoder states are."""
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, 1, 2 * M)
    neighbors[:, :, 1] = cfg.pad_id
    a, _ = model(tokens, neighbors)
    neighbors2 = neighbors.clone()
    neighbors2[:, :, 0, cfg.chunk_len :] = cfg.pad_id  # change only the real neighbour's continuation
    b, _ = model(tokens, neighbors2)
    assert not torch.allclose(a, b)  # real tokens matter ...
    neighbors3 = neighbors.clone()
    neighbors3[:, :, 1, 0] = cfg.pad_id  # ... padding changes nothing
    c, _ = model(tokens, neighbors3)
    torch.testing.assert_close(a, c)


def test_loss_ignores_padding_targets_and_masked_positions():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, 2, 2 * M)
    targets = tokens.roll(-1, dims=1)
    logits, _ = model(tokens, neighbors)
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), reduction="none"
    )
    padded = targets.clone()
    padded[:, -5:] = cfg.pad_id
    _, loss = model(tokens, neighbors, targets=padded)
    keep = (padded != cfg.pad_id).reshape(-1)
    torch.testing.assert_close(loss, per_token[keep].mean())
    mask = torch.ones_like(targets)
    mask[0] = 0
    _, loss_masked = model(tokens, neighbors, targets=targets, loss_mask=mask)
    torch.testing.assert_close(loss_masked, per_token.view(2, -1)[1].mean())


def test_debug_model_overfits_one_batch():
    cfg = RetroConfig.from_name("debug", vocab_size=64, chunk_len=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Retro(cfg)
    tokens, neighbors = random_inputs(cfg, 2, 64)
    targets = tokens.roll(-1, dims=1)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(tokens, neighbors, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 3.5  # ~ln(64) = 4.16 at init
    assert loss.item() < 0.2, f"did not overfit: {first:.3f} -> {loss.item():.3f}"


def test_baseline_has_no_retrieval_parameters_and_ignores_neighbors():
    cfg = tiny_config(retrieval=False)
    model = make_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any("cca" in n or "encoder" in n or "enc_" in n for n in names)
    retro = make_model(tiny_config())
    assert retro.num_parameters() > model.num_parameters()
    tokens, neighbors = random_inputs(cfg, 1, 2 * M)
    a, _ = model(tokens, neighbors)
    b, _ = model(tokens, None)
    torch.testing.assert_close(a, b)


def test_retrieval_off_equals_no_neighbors():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, _ = random_inputs(cfg, 1, 20)
    logits, _ = model(tokens, None)
    assert logits.shape == (1, 20, cfg.vocab_size) and torch.isfinite(logits).all()


def test_param_groups_cover_every_parameter_once():
    model = make_model(tiny_config())
    groups = model.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert all(p.dim() == 2 for p in groups[0]["params"])
    assert any(p.dim() == 1 for p in groups[1]["params"])


def test_bf16_autocast_runs_on_cpu():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens, neighbors = random_inputs(cfg, 1, 2 * M)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens, neighbors, targets=tokens)
    assert torch.isfinite(loss)


def _loss_and_grads(model: Retro, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    logits, loss = model(*args, **kwargs)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("retrieval", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_equals_full_cross_entropy(retrieval, chunk):
    """return_logits=False computes the loss in row chunks: same loss (1e-5) and gradients as the full one."""
    cfg = tiny_config(retrieval=retrieval, loss_chunk_tokens=chunk)
    model = make_model(cfg).train()
    tokens, neighbors = random_inputs(cfg, 3, 3 * M + 5)
    targets = tokens.roll(-1, dims=1)
    targets[0, :4] = cfg.pad_id
    mask = torch.ones_like(targets)
    mask[1, 3:11] = 0
    args = (tokens, neighbors if retrieval else None)
    full_logits, full, full_grads = _loss_and_grads(model, *args, targets=targets, loss_mask=mask)
    logits, chunked, grads = _loss_and_grads(
        model, *args, targets=targets, loss_mask=mask, return_logits=False
    )
    assert full_logits.shape == (3, 3 * M + 5, cfg.vocab_size) and logits is None
    assert abs(full.item() - chunked.item()) <= 1e-5
    reference = torch.nn.functional.cross_entropy(
        full_logits.reshape(-1, cfg.vocab_size),
        targets.masked_fill((targets == cfg.pad_id) | (mask == 0), -100).reshape(-1),
    )
    assert abs(reference.item() - chunked.item()) <= 1e-5
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation path: loss only, same value
        _, no_grad_loss = model(*args, targets=targets, loss_mask=mask, return_logits=False)
    assert abs(no_grad_loss.item() - full.item()) <= 1e-5


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_cross_entropy_with_and_without_autocast(autocast):
    """Both paths of the chunked loss (reused fp32 buffer; bf16 autocast matmuls) equal F.cross_entropy."""
    from retro_model.loss import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.3).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[::5] = IGNORE_INDEX
    results = []
    for fn in (
        lambda: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight).float(), targets
        ),
        lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=8),
    ):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (ref_loss, ref_gh, ref_gw), (loss, gh, gw) = results
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(gh, ref_gh, **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)


def test_training_step_saves_no_logits_sized_tensor():
    """Without returned logits, nothing of size b*n*V (or wider than a row chunk of it) is kept for backward."""
    cfg = tiny_config(vocab_size=8192, loss_chunk_tokens=16)
    model = make_model(cfg).train()
    tokens, neighbors = random_inputs(cfg, 4, 16 * M)  # b*n = 512 rows of logits, d = 32
    b, n = tokens.shape
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(tokens, neighbors, targets=tokens.roll(-1, 1), return_logits=False)
    loss.backward()
    assert saved and max(saved) < b * n * cfg.vocab_size // 4
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, neighbors, targets=tokens.roll(-1, 1))  # the full version keeps [b*n, V]
    assert max(saved) >= b * n * cfg.vocab_size


def assert_same_values_and_grads(fast, slow, *inputs, generator):
    """``fast(*inputs)`` equals ``slow(*inputs)``, and so does the gradient of every input for one
    random output gradient -> fast's output."""
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    out_a, out_b = fast(*a), slow(*b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out_a.shape, generator=generator)
    out_a.backward(grad)
    out_b.backward(grad)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    return out_a


def test_memory_lean_ops_match_composite():
    """rms_norm, rms_norm_linear, rotary_qkv and gelu_linear equal their composite versions with grads."""
    from retro_model.model import apply_rotary, rotary_tables
    from retro_model.ops import gelu_linear, rms_norm, rms_norm_linear, rotary_qkv

    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)

    def check(fast, slow, *inputs):
        assert_same_values_and_grads(fast, slow, *inputs, generator=g)

    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(16, generator=g)
    lin = torch.randn(24, 16, generator=g)
    check(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (16,), w, 1e-6), x, w)
    check(
        lambda x, w, lin: rms_norm_linear(x, w, 1e-6, lin),
        lambda x, w, lin: F.linear(F.rms_norm(x, (16,), w, 1e-6), lin),
        x,
        w,
        lin,
    )
    hidden = torch.randn(3, 5, 24, generator=g)
    for approximate in ("none", "tanh"):
        check(
            lambda a, w, approximate=approximate: gelu_linear(a, w, approximate),
            lambda a, w, approximate=approximate: F.linear(F.gelu(a, approximate=approximate), w),
            hidden,
            torch.randn(16, 24, generator=g),
        )
    cos, sin = rotary_tables(5, 8, 10000.0)
    qkv = torch.randn(3, 5, 3, 2, 8, generator=g)  # (B, t, 3, h, s)

    def composite(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, h, t, s)
        return torch.stack((apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v))

    check(lambda qkv: torch.stack(rotary_qkv(qkv, cos, sin)), composite, qkv)


def test_cpu_feed_forward_in_row_pieces_equals_one_piece(monkeypatch):
    """Splitting a CPU feed-forward into row pieces (to keep its hidden activations small) changes
    neither its output nor its gradients."""
    from retro_model import model as model_module

    torch.manual_seed(0)
    ff = model_module.FeedForward(16, 64, 0.0, "gelu")
    norm = model_module.RMSNorm(16, 1e-6)
    x = torch.randn(3, 11, 16)
    grad = torch.randn(3, 11, 16)
    results = []
    for piece_elements in (10**9, 5 * 64):  # one piece; pieces of 5 rows (7 pieces, the last of 3)
        monkeypatch.setattr(model_module, "CPU_FFN_PIECE_ELEMENTS", piece_elements)
        ff.zero_grad()
        inp = x.clone().requires_grad_()
        out = ff(inp, norm=norm)
        out.backward(grad)
        results.append((out.detach(), inp.grad, ff.up.weight.grad.clone(), norm.weight.grad.clone()))
        norm.weight.grad = None
    assert results[1][0].shape == (3, 11, 16)
    for one, pieces in zip(*results, strict=True):
        torch.testing.assert_close(pieces, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_null", [True, False])
def test_kv_heads_matches_concatenate_and_split(with_null):
    """kv_heads equals prepending the null key/value and splitting k from v, with grads for both inputs."""
    from retro_model.ops import kv_heads

    g = torch.Generator().manual_seed(1)
    kv = torch.randn(3, 7, 2 * 2 * 8, generator=g)  # (B, c, 2*dim), 2 heads of size 8
    null = torch.randn(2, 16, generator=g)

    def fast(kv, null=None):
        return torch.stack(kv_heads(kv, null, 2))

    def slow(kv, null=None):
        if null is not None:
            kv = torch.cat((null.reshape(1, 1, 32).expand(3, 1, 32), kv), dim=1)
        return torch.stack(tuple(kv.view(3, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)))

    assert_same_values_and_grads(fast, slow, *((kv, null) if with_null else (kv,)), generator=g)
    k, v = kv_heads(kv, null if with_null else None, 2)
    assert k.shape == (3, 2, 7 + with_null, 8) and k.is_contiguous() and v.is_contiguous()


@pytest.mark.parametrize("length", [1, 40, 64, 150, 256])
def test_blocked_causal_attention_matches_sdpa(length):
    """The CPU blocked causal attention equals scaled_dot_product_attention(is_causal=True), with grads,
    for lengths below, at and between multiples of its 64-row block; autocast takes the SDPA path."""
    from retro_model.ops import CAUSAL_BLOCK, causal_attention

    assert CAUSAL_BLOCK == 64
    g = torch.Generator().manual_seed(length)
    q, k, v = torch.randn(3, 2, 3, length, 16, generator=g)  # each (B, h, t, s)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = assert_same_values_and_grads(causal_attention, sdpa, q, k, v, generator=g)
    assert out.grad_fn.name().startswith("_BlockCausalAttention")
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not causal_attention(*inputs).grad_fn.name().startswith("_BlockCausalAttention")


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(chunk_len=0), "chunk_len"),
        (dict(dropout=1.5), "dropout"),
        (dict(cca_layers=(7,)), "cca_layers"),
        (dict(pad_id=99, vocab_size=50), "pad_id"),
        (dict(num_neighbors=0), "num_neighbors"),
        (dict(max_seq_len=4, chunk_len=8), "max_seq_len"),
        (dict(loss_chunk_tokens=0), "loss_chunk_tokens"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_paper_cca_rule_and_presets():
    from retro_model.config import PRESETS, paper_cca_layers

    assert paper_cca_layers(32) == tuple(range(6, 33, 3))
    assert paper_cca_layers(6) == (3, 6)
    assert paper_cca_layers(2) == (1,)
    for name in PRESETS:
        cfg = RetroConfig.from_name(name)
        assert cfg.resolved_cca_layers
    with pytest.raises(ValueError, match="preset"):
        RetroConfig.from_name("huge")
    sizes = {name: Retro(RetroConfig.from_name(name)).num_parameters() for name in ("debug", "small")}
    assert sizes["debug"] < sizes["small"]
