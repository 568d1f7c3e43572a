"""LoRA on a family member with peft, and the conversions between a peft model and an :class:`AdapterUpdate`.

Keys: an update travels under family-wide keys (``member.key_of(module path)``, the one
:class:`aiflow_fl.family.member.Member`); a device maps them back to its own module paths. The
server-sent dense base ``scaling · B @ A`` is folded into the frozen weights with
:meth:`Member.fold <aiflow_fl.family.member.Member.fold>` *before* LoRA is attached (protocol: ``base``
is cumulative since the run's start, so it is folded into freshly loaded weights every round).
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from aiflow_fl.aggregation.update import AdapterUpdate, from_peft_state_dict, to_peft_state_dict
from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import Member


def attach_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str], seed: int = 0) -> PeftModel:
    """Wrap ``model`` with fresh peft LoRA adapters (A: Kaiming-uniform from ``seed``, B: zeros)."""
    if rank < 1:
        raise AiflowError(f"LoRA rank is {rank}; it must be >= 1.")
    if not 0.0 <= dropout < 1.0:
        raise AiflowError(f"lora.dropout is {dropout}; it must be in [0, 1).")
    torch.manual_seed(seed)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise AiflowError(
            f"lora.target_modules {list(target_modules)} matched no module of the member: {str(exc).splitlines()[0]} "
            "Use linear names of the decoder layers, e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."
        ) from None


def lora_module_paths(peft_model: PeftModel) -> list[str]:
    """Member module paths (backbone naming) that carry a LoRA adapter."""
    prefix = "base_model.model."
    return [name[len(prefix):] if name.startswith(prefix) else name
            for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0]


def extract_update(peft_model: PeftModel, member: Member, alpha: float, num_examples: int) -> AdapterUpdate:
    """The trained factors as an update keyed by family-wide keys (scaling = alpha / r)."""
    local = from_peft_state_dict(get_peft_model_state_dict(peft_model), alpha, num_examples=num_examples, member=member.name)
    local.layers = {member.key_of(path): factors for path, factors in local.layers.items()}
    return local


def load_update(peft_model: PeftModel, member: Member, update: AdapterUpdate, alpha: float) -> int:
    """Start LoRA from the server's factors; returns how many modules were set. Raises ValueError when
    the update names modules this member lacks or has factors of the wrong shape."""
    paths = {member.key_of(p): p for p in lora_module_paths(peft_model)}
    unknown = sorted(set(update.layers) - set(paths))
    if unknown:
        raise ValueError(f"server LoRA names modules this member lacks: {unknown[:3]}")
    local = AdapterUpdate({paths[k]: f for k, f in update.layers.items()}, update.num_examples)
    state = to_peft_state_dict(local, alpha)
    current = get_peft_model_state_dict(peft_model)
    for key, value in state.items():
        if key not in current or current[key].shape != value.shape:
            got = tuple(current[key].shape) if key in current else None
            raise ValueError(f"server LoRA {key} has shape {tuple(value.shape)}, the member's is {got}")
    set_peft_model_state_dict(peft_model, {k: v.to(current[k].dtype) for k, v in state.items()})
    return len(local.layers)
