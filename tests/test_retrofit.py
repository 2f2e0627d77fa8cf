"""Retro-fitting (RETRO paper section 4): a RETRO model started from a trained baseline's decoder.

Torch-only tests of ``retro_model.retrofit`` (which tensors are copied, kept fresh, frozen), then the
platform: a baseline trained on Ray Train, a RETRO run initialised from its checkpoint with the decoder
frozen (2 DDP workers), and the checkpoints ``train.init_from`` refuses before anything is written.
"""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
import torch
from conftest import debug_config, synthetic_manifest

from retro_model.checkpoint import load_model_dir, save_model_dir
from retro_model.config import RetroConfig
from retro_model.model import Retro
from retro_model.retrofit import (
    copy_matching_weights,
    count_parameters,
    freeze_decoder,
    is_retrieval_parameter,
    plan_copy,
)
from retro_platform.errors import CheckpointError

TINY = dict(vocab_size=96, d_model=32, n_heads=2, n_layers=3, d_ff=64, enc_layers=1, max_seq_len=128)


def tiny(**overrides) -> RetroConfig:
    """A 3-layer model small enough for a unit test."""
    return RetroConfig.from_dict({**TINY, "chunk_len": 8, "neighbor_len": 16, **overrides})


def test_retrieval_names_are_exactly_what_the_baseline_lacks():
    retro, baseline = Retro(tiny()), Retro(tiny(retrieval=False))
    extra = set(retro.state_dict()) - set(baseline.state_dict())
    assert extra == {name for name in retro.state_dict() if is_retrieval_parameter(name)}
    assert not any(is_retrieval_parameter(name) for name in baseline.state_dict())
    assert any(".cca." in name for name in extra) and any(name.startswith("encoder.") for name in extra)


def test_copy_takes_the_decoder_and_leaves_the_retrieval_path_at_its_initialisation():
    torch.manual_seed(1)
    baseline = Retro(tiny(retrieval=False))
    torch.manual_seed(2)
    retro = Retro(tiny())
    before = {k: v.clone() for k, v in retro.state_dict().items()}
    state = {k: v for k, v in baseline.state_dict().items() if k != "head.weight"}  # as checkpoints store it
    plan = copy_matching_weights(retro, state)
    after = retro.state_dict()
    assert set(plan.copied) == set(state) and not plan.ignored
    assert set(plan.fresh) == {k for k in after if is_retrieval_parameter(k)}
    for name, value in after.items():
        if is_retrieval_parameter(name):
            assert torch.equal(value, before[name]), name
        else:  # the decoder, with the tied head
            assert torch.equal(value, baseline.state_dict()[name]), name
            assert not torch.equal(value, before[name]) or value.dim() == 1, name  # norms start at ones
    assert retro.head.weight is retro.embed.weight

    # frozen decoder: only the retrieval path is trainable and reaches the optimizer
    frozen = freeze_decoder(retro)
    assert "embed.weight" in frozen and not any(is_retrieval_parameter(n) for n in frozen)
    assert not retro.head.weight.requires_grad
    trainable = {n for n, p in retro.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in retro.named_parameters() if is_retrieval_parameter(n)}
    in_optimizer = {id(p) for group in retro.param_groups(0.1) for p in group["params"]}
    assert in_optimizer == {id(p) for p in retro.parameters() if p.requires_grad}
    assert count_parameters(retro, trainable_only=True) < count_parameters(retro)
    tokens = torch.randint(1, 96, (2, 16))
    _, loss = retro(tokens, torch.randint(1, 96, (2, 2, 2, 16)), targets=tokens)
    loss.backward()
    assert all(p.grad is None for n, p in retro.named_parameters() if not is_retrieval_parameter(n))
    assert all(p.grad is not None for n, p in retro.named_parameters() if ".cca.q." in n)


def test_copy_refuses_other_shapes_and_layer_counts_without_touching_the_model():
    retro = Retro(tiny())
    before = {k: v.clone() for k, v in retro.state_dict().items()}
    for other in (tiny(retrieval=False, d_model=48), tiny(retrieval=False, n_layers=2)):
        source = Retro(other).state_dict()
        source.pop("head.weight")
        with pytest.raises(ValueError, match="embed.weight|layers.2"):
            copy_matching_weights(retro, source)
        assert all(torch.equal(v, before[k]) for k, v in retro.state_dict().items())
    untied = Retro(tiny(retrieval=False, tie_embeddings=False)).state_dict()
    with pytest.raises(ValueError, match="head.weight"):
        plan_copy(retro, {k: v.shape for k, v in untied.items()})
    # a RETRO source into a baseline: the source's retrieval tensors are ignored
    plan = plan_copy(
        Retro(tiny(retrieval=False)), {k: v.shape for k, v in before.items() if k != "head.weight"}
    )
    assert plan.ignored and all(is_retrieval_parameter(n) for n in plan.ignored) and not plan.fresh


# ---- on Ray Train --------------------------------------------------------------------------------------


def retrofit_config(work, db_path, name, *overrides):
    """The debug preset on the shared debug database (read only), runs and MLflow under ``work``."""
    return debug_config(
        work,
        f"database.path={db_path}",
        f"train.name={name}",
        f"train.storage_path={work / 'results'}",
        "train.eval_every=0",
        "train.eval_batches=4",
        "train.checkpoint_every=100",
        "train.log_every=5",
        *overrides,
    )


def test_retrofit_copies_the_baseline_decoder_and_trains_only_retrieval(debug_db, tmp_path):
    from retro_platform.checkpoints import model_for_database
    from retro_platform.commands.train import run_training

    db_config, manifest = debug_db
    baseline_out = run_training(
        retrofit_config(
            tmp_path,
            db_config.db_path,
            "base",
            "model.retrieval=false",
            "train.steps=6",
            "train.num_workers=1",
        )
    )
    base_dir = tmp_path / "results" / "base"
    config = retrofit_config(
        tmp_path,
        db_config.db_path,
        "retrofit",
        "train.steps=24",
        f"train.init_from={base_dir}",  # a run directory: its newest checkpoint
        "train.freeze=decoder",
        "train.eval_every=6",
    )
    out = run_training(config)
    baseline, _ = load_model_dir(baseline_out["checkpoint"])
    retro, extra = load_model_dir(out["checkpoint"])
    assert extra["step"] == 24 and extra["freeze"] == "decoder"
    base_state, retro_state = baseline.state_dict(), retro.state_dict()
    for name, value in base_state.items():  # the decoder: bit for bit the baseline's
        assert torch.equal(retro_state[name], value), name
    torch.manual_seed(config.train.seed)  # what the workers built before copying
    initial = Retro(model_for_database(config, manifest).model).state_dict()
    retrieval = [k for k in retro_state if is_retrieval_parameter(k)]
    assert retrieval and set(retrieval) == set(retro_state) - set(base_state)
    unchanged = [k for k in retrieval if torch.equal(retro_state[k], initial[k])]
    assert not unchanged, unchanged

    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.get_run(out["run_id"])
    params = run.data.params
    assert params["train.freeze"] == "decoder" and params["train.init_from"] == str(base_dir)
    assert int(params["trainable_parameters"]) == sum(retro_state[k].numel() for k in retrieval)
    assert int(params["trainable_parameters"]) < int(params["num_parameters"]) == retro.num_parameters()
    assert int(params["retrofit.fresh_tensors"]) == len(retrieval)

    # the same fixed valid batches every 6 steps: without retrieval the loss is the frozen baseline's,
    # with retrieval it falls below it (train_loss is no measure here: the first batches are the ones the
    # baseline trained on, so they start lower)
    def curve(run_id, key):
        return [m.value for m in client.get_metric_history(run_id, key)]

    plain, with_retrieval = (
        curve(out["run_id"], "valid_loss_no_retrieval"),
        curve(out["run_id"], "valid_loss_retrieval"),
    )
    assert len(plain) == len(with_retrieval) == 4 and len(curve(out["run_id"], "train_loss")) == 24
    assert plain == [plain[0]] * 4 and plain[0] == pytest.approx(
        curve(baseline_out["run_id"], "valid_loss_no_retrieval")[-1], rel=1e-6
    )
    assert with_retrieval[-1] < with_retrieval[0] and with_retrieval[-1] < plain[0] - 0.003, (
        with_retrieval,
        plain,
    )


def test_init_from_refuses_missing_and_mismatched_checkpoints_before_writing(debug_db, tmp_path):
    from retro_platform.checkpoints import model_for_database
    from retro_platform.commands.train import run_training

    db_config, manifest = debug_db
    model_cfg = model_for_database(retrofit_config(tmp_path, db_config.db_path, "x"), manifest).model
    sha = manifest.tokenizer.sha256
    wide = tmp_path / "wide"  # another d_model
    save_model_dir(
        wide, Retro(dataclasses.replace(model_cfg, retrieval=False, d_model=96)), {"tokenizer_sha256": sha}
    )
    other_tok = tmp_path / "other-tok"
    save_model_dir(
        other_tok, Retro(dataclasses.replace(model_cfg, retrieval=False)), {"tokenizer_sha256": "0" * 64}
    )
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "holds no checkpoint",
        str(wide): r"different shapes.*embed.weight.*'d_model': \(96, 64\)",
        str(other_tok): "another tokenizer",
    }
    for path, message in cases.items():
        config = retrofit_config(tmp_path, db_config.db_path, "refused", f"train.init_from={path}")
        with pytest.raises(CheckpointError, match=message) as info:
            run_training(config)
        assert "train.init_from" in str(info.value)
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match="train.freeze"):
        retrofit_config(tmp_path, db_config.db_path, "bad", "model.retrieval=false", "train.freeze=decoder")


def test_a_resumed_run_keeps_its_freeze_setting(tmp_path):
    from retro_platform.checkpoints import check_resumable, model_for_database

    manifest = synthetic_manifest(
        chunk_len=64, vocab_size=512, pad_id=0, tokenizer_sha256="abc", index_vectors=(5,)
    )
    frozen = model_for_database(debug_config(tmp_path, "train.freeze=decoder"), manifest)
    save_model_dir(
        tmp_path / "ck", Retro(frozen.model), {"step": 3, "tokenizer_sha256": "abc", "freeze": "decoder"}
    )
    assert check_resumable(frozen, tmp_path / "ck", manifest)["step"] == 3
    with pytest.raises(CheckpointError, match="train.freeze=decoder, but train.freeze=none now"):
        check_resumable(model_for_database(debug_config(tmp_path), manifest), tmp_path / "ck", manifest)
