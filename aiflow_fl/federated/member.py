"""The model a device trains: its family member, loaded on its own.

When ``family.dir`` holds a built family (``aiflow family build``), a member comes from
``aiflow_fl.family.load_member(family_dir, name)`` and its module paths are mapped to family-wide
keys with ``aiflow_fl.family.align_key``. Until a family is built, a device's member is an
**early-exit member of the backbone** (paper §III-A2 without a branch): the first ``k`` decoder
layers plus the shared final norm and LM head, built in code from the backbone:

* ``eesb-i``  -> ``k = round(family.budgets[i] · L)`` (at least 1), the same budgets a family uses;
* ``exit-k``  -> the first ``k`` layers;
* ``full``    -> the whole backbone.

Early-exit members keep the backbone's module paths (``model.layers.3.self_attn.q_proj``), so their
alignment key is the path itself and a shallow member's update simply has fewer keys.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError


@dataclass
class Member:
    """A device's causal LM, its tokenizer and how its module paths map to family-wide keys."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    key_of: Callable[[str], str]  # member module path -> key that updates travel under
    num_layers: int


def exit_layers(name: str, total_layers: int, budgets: list[float]) -> int:
    """Number of backbone layers an early-exit member keeps (see module doc for the names)."""
    if name == "full":
        return total_layers
    match = re.fullmatch(r"(eesb|exit)-(\d+)", name)
    if match is None:
        raise AiflowError(
            f"Member '{name}' is not a known member name. Without a built family (family.dir) members are "
            f"'eesb-i' (i < {len(budgets)}, a fraction family.budgets[i] of the layers), 'exit-k' "
            f"(1 <= k <= {total_layers}) or 'full'."
        )
    kind, number = match.group(1), int(match.group(2))
    if kind == "eesb":
        if number >= len(budgets):
            raise AiflowError(f"Member '{name}': family.budgets has {len(budgets)} entries, so i must be < {len(budgets)}.")
        return max(1, min(total_layers, round(budgets[number] * total_layers)))
    if not 1 <= number <= total_layers:
        raise AiflowError(f"Member '{name}': k must be between 1 and {total_layers} (the backbone's layers).")
    return number


def truncate_layers(model: PreTrainedModel, k: int) -> PreTrainedModel:
    """Keep the first ``k`` decoder layers in place (shared norm and LM head stay): an early exit."""
    decoder = model.model
    decoder.layers = nn.ModuleList(list(decoder.layers)[:k])
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:k]
    return model


def family_available(cfg: AiflowConfig) -> bool:
    """A built family folder exists and the family package can load members from it."""
    try:
        from aiflow_fl import family
    except ImportError:
        return False
    return (Path(cfg.family.dir) / "family.json").is_file() and hasattr(family, "load_member")


_PRISTINE: dict[tuple[str, str, str], Member] = {}
_MAX_CACHED = 3


def load_member(cfg: AiflowConfig, name: str) -> Member:
    """A fresh copy of member ``name`` (frozen weights as built; cached per process)."""
    key = (cfg.model.name, cfg.family.dir if family_available(cfg) else "", name)
    if key not in _PRISTINE:
        if len(_PRISTINE) >= _MAX_CACHED:  # a device uses one member, the server a few: bound memory
            _PRISTINE.pop(next(iter(_PRISTINE)))
        _PRISTINE[key] = _build_member(cfg, name)
    return _fresh_copy(_PRISTINE[key])


def _fresh_copy(member: Member) -> Member:
    """A copy with its own module tree (LoRA injection and hooks stay in it) whose frozen weights are the
    cached tensors, not a copy of them (a device round no longer copies the whole model: ~0.4 s and
    0.5 GB for SmolLM2). Safe because nothing writes into a member's frozen weights in place:
    :func:`aiflow_fl.federated.lora.fold_base` gives a module a new weight tensor instead. Each
    parameter gets a new ``Parameter`` object (``module.to(...)`` on the copy replaces its data only),
    tied parameters stay tied (one memo entry per tensor)."""
    memo: dict[int, object] = {}
    for param in member.model.parameters():
        memo[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
    for buffer in member.model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(member, memo)


def _build_member(cfg: AiflowConfig, name: str) -> Member:
    if family_available(cfg):
        from aiflow_fl import family

        model, tokenizer, spec = family.load_member(cfg.family.dir, name, dtype=getattr(torch, cfg.model.dtype))
        model.requires_grad_(False)
        return Member(name, model, tokenizer, lambda path: family.align_key(spec, path), model.config.num_hidden_layers)
    from aiflow_fl.models import load_backbone

    loaded = load_backbone(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    total = loaded.model.config.num_hidden_layers
    k = exit_layers(name, total, list(cfg.family.budgets))
    model = truncate_layers(loaded.model, k)
    model.requires_grad_(False)
    return Member(name, model, loaded.tokenizer, lambda path: path, k)
