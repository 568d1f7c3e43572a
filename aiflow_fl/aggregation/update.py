"""The unit that travels in federated rounds: a LoRA adapter update, keyed by backbone module path.

``AdapterUpdate.layers["model.layers.3.self_attn.q_proj"] = LoraFactors(A, B, scaling)`` means the
device's update of that linear is ``ΔW = scaling · B @ A`` (A: r×in, B: out×r, scaling = alpha/r, as
in peft). Keys use the backbone's module names, so updates of different family members align by key:
a shallow member simply has fewer keys. Aggregation functions take a list of these and return one;
they know nothing of Flower, files or networks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraFactors:
    """One linear's low-rank update ΔW = scaling · B @ A."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update, in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class AdapterUpdate:
    """A device's (or an edge's) update: factors per backbone module path, and its weight."""

    layers: dict[str, LoraFactors]
    num_examples: int
    member: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    # Examples behind each key when they differ per key (an edge's merge of members of different
    # depths); None: every key has ``num_examples``.
    key_examples: dict[str, int] | None = None

    def examples_for(self, key: str) -> int:
        """The aggregation weight of this update for one key (layer alignment)."""
        if self.key_examples is not None and key in self.key_examples:
            return self.key_examples[key]
        return self.num_examples

    def deltas(self) -> dict[str, torch.Tensor]:
        return {key: f.delta() for key, f in self.layers.items()}

    def num_bytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size() for f in self.layers.values())


def from_peft_state_dict(state: dict[str, torch.Tensor], alpha: float, **kwargs) -> AdapterUpdate:
    """Build an update from ``peft.get_peft_model_state_dict`` output (scaling = alpha / r per layer)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            continue  # not a LoRA factor (e.g. a modules_to_save tensor)
        factors.setdefault(match["module"], {})[match["which"]] = value.detach().clone()
    layers = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA state for '{module}' has {sorted(pair)} but needs both A and B.")
        layers[module] = LoraFactors(pair["A"], pair["B"], alpha / pair["A"].shape[0])
    return AdapterUpdate(layers=layers, **kwargs)


def to_peft_state_dict(update: AdapterUpdate, alpha: float) -> dict[str, torch.Tensor]:
    """peft state-dict keys for ``set_peft_model_state_dict``; B is rescaled so that peft's own
    scaling (alpha / r) reproduces each layer's ΔW exactly."""
    state = {}
    for module, f in update.layers.items():
        peft_scaling = alpha / f.rank
        state[f"base_model.model.{module}.lora_A.weight"] = f.A.clone()
        state[f"base_model.model.{module}.lora_B.weight"] = f.B * (f.scaling / peft_scaling)
    return state
