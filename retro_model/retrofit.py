"""Retro-fitting (RETRO paper, section 4): start a RETRO model from a trained decoder, train only retrieval.

A trained decoder-only baseline (``RetroConfig.retrieval=False``) and a RETRO model of the same
decoder size share every decoder parameter name and shape: ``embed``, ``layers.<i>.{norm_attn, attn,
norm_ff, ff}``, the final ``norm`` and the ``head`` (tied to ``embed`` by default). RETRO adds the
retrieval path: the neighbour encoder (``encoder.*``), its input projection and norms (``enc_*``) and,
in the CCA layers, the chunked cross-attention and its norm (``layers.<i>.cca.*``,
``layers.<i>.norm_cca.*``).

* ``plan_copy`` matches a model's tensors against a source's names and shapes (without touching any
  weight; the model may live on the ``meta`` device) and refuses what cannot be copied;
* ``copy_matching_weights`` copies a state dict into a model by that plan -> what was copied / kept
  fresh;
* ``freeze_decoder`` turns off ``requires_grad`` for every decoder parameter, so only the retrieval
  path trains (``Retro.param_groups`` leaves frozen parameters out of the optimizer).

Torch only: the platform reads checkpoints and wraps the model for DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

RETRIEVAL_TOP_LEVEL = ("encoder",)
"""Top-level modules that belong to the retrieval path (besides every ``enc_*`` module)."""

RETRIEVAL_IN_LAYER = ("cca", "norm_cca")
"""Sub-modules of a decoder layer that belong to the retrieval path."""


def is_retrieval_parameter(name: str) -> bool:
    """True for a state-dict name of the retrieval path: ``encoder.*``, ``enc_*``, ``layers.<i>.cca.*``,
    ``layers.<i>.norm_cca.*``; False for the decoder (what a ``retrieval=False`` model also has)."""
    parts = name.split(".")
    if parts[0] in RETRIEVAL_TOP_LEVEL or parts[0].startswith("enc_"):
        return True
    return len(parts) > 2 and parts[0] == "layers" and parts[2] in RETRIEVAL_IN_LAYER


@dataclass
class RetrofitPlan:
    """What initialising a model from a source state dict does, by state-dict name."""

    copied: list[str] = field(default_factory=list)
    """Model tensors the source provides with the same shape (copied)."""
    fresh: list[str] = field(default_factory=list)
    """Retrieval tensors of the model the source does not have (they keep their initialisation)."""
    ignored: list[str] = field(default_factory=list)
    """Retrieval tensors of the source the model does not have (e.g. a RETRO source, baseline model)."""

    def summary(self) -> str:
        """One line: how many tensors are copied, kept fresh and ignored."""
        return (
            f"{len(self.copied)} tensors copied, {len(self.fresh)} kept at their initialisation, "
            f"{len(self.ignored)} of the source ignored"
        )


def _own_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state-dict tensors without aliases -> (name -> tensor, alias name -> owner name).

    With tied embeddings ``head.weight`` is ``embed.weight``: it is owned by ``embed.weight``, and a
    source stores it once (``retro_model.checkpoint`` drops ``head.weight``).
    """
    owners: dict[int, str] = {}
    own: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in owners:
            aliases[name] = owners[id(tensor)]
            continue
        owners[id(tensor)] = name
        own[name] = tensor
    return own, aliases


def plan_copy(model: nn.Module, source_shapes: Mapping[str, Sequence[int]]) -> RetrofitPlan:
    """Match ``model``'s tensors with a source's ``name -> shape`` -> the plan, or ValueError.

    Copied: every tensor present in both with the same shape. Kept fresh: retrieval tensors the source
    lacks. Refused (ValueError naming the tensors): a tensor of both with another shape (different
    d_model, n_layers, vocabulary, widths), a decoder tensor only one side has (different n_layers, or
    tied vs untied embeddings). Reads shapes only, so ``model`` may be on the ``meta`` device.
    """
    own, aliases = _own_tensors(model)
    plan = RetrofitPlan()
    shape_errors, missing, unexpected = [], [], []
    for name, tensor in own.items():
        if name not in source_shapes:
            (plan.fresh if is_retrieval_parameter(name) else missing).append(name)
        elif tuple(source_shapes[name]) != tuple(tensor.shape):
            shape_errors.append(f"{name} {tuple(source_shapes[name])} vs {tuple(tensor.shape)}")
        else:
            plan.copied.append(name)
    for name in source_shapes:
        if name in own:
            continue
        if name in aliases:
            unexpected.append(f"{name} (the model ties it to {aliases[name]})")
        elif is_retrieval_parameter(name):
            plan.ignored.append(name)
        else:
            unexpected.append(name)
    problems = []
    if shape_errors:
        problems.append(f"different shapes (source vs model): {_few(shape_errors)}")
    if missing:
        problems.append(f"decoder tensors the source lacks: {_few(missing)}")
    if unexpected:
        problems.append(f"decoder tensors the model lacks: {_few(unexpected)}")
    if problems:
        raise ValueError("; ".join(problems))
    return plan


def _few(names: list[str], limit: int = 4) -> str:
    """The first ``limit`` entries, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def copy_matching_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> RetrofitPlan:
    """Copy every tensor of ``state`` whose name and shape the model shares -> the plan that was applied.

    All-or-nothing: the plan is checked first (``plan_copy``; ValueError when the source does not fit),
    then the values are copied in place (cast to the model tensor's dtype and device). Retrieval
    tensors the source lacks keep their values, and the source's extra retrieval tensors are ignored.
    """
    plan = plan_copy(model, {name: tuple(tensor.shape) for name, tensor in state.items()})
    own, _ = _own_tensors(model)
    for name in plan.copied:
        own[name].copy_(state[name])
    return plan


def freeze_decoder(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every decoder parameter -> their names (tied ones once).

    What stays trainable is the retrieval path (``is_retrieval_parameter``). With tied embeddings the
    head is ``embed.weight`` and is frozen with it. Call before the optimizer is built and before DDP
    wraps the model.
    """
    frozen = []
    for name, parameter in model.named_parameters():
        if not is_retrieval_parameter(name):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); ``trainable_only``: those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
