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


def factor_shape_problem(A: torch.Tensor, B: torch.Tensor) -> str:
    """Why (A, B) is not a LoRA pair (A: r×in, B: out×r), or "" when it is one."""
    if A.ndim != 2 or B.ndim != 2:
        return f"LoRA factors must be 2-D, got A{tuple(A.shape)} and B{tuple(B.shape)}"
    if A.shape[0] != B.shape[1]:
        return (f"LoRA factors disagree on the rank: A{tuple(A.shape)} has {A.shape[0]} rows but B{tuple(B.shape)} "
                f"has {B.shape[1]} columns (A is r×in, B is out×r; swapped factors look like this)")
    return ""


@dataclass
class LoraFactors:
    """One linear's low-rank update ΔW = scaling · B @ A."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float

    def __post_init__(self) -> None:
        # A pair whose ranks disagree would otherwise surface later as a raw torch matmul error (or be
        # zero-padded silently by the factor-averaging methods).
        problem = factor_shape_problem(self.A, self.B)
        if problem:
            raise ValueError(problem)

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

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

    def __post_init__(self) -> None:
        for key, f in self.layers.items():
            if not isinstance(f, LoraFactors):
                raise ValueError(f"update key '{key}' holds a {type(f).__name__}, not LoraFactors")

    def check_shapes(self, known: dict[str, tuple[int, int]] | None = None) -> None:
        """Raise ValueError, naming the key and the shapes, when a layer's factors cannot be a LoRA
        update of that module: (out, in) differs from ``known[key]`` (the module's shape), or the rank
        exceeds min(out, in) — what a pair with A and B swapped looks like on a square module, where the
        ranks happen to agree (A: out×r read as r'×in with r' = out)."""
        for key, f in self.layers.items():
            shape = (f.out_features, f.in_features)
            if known is not None and key in known and known[key] != shape:
                raise ValueError(
                    f"module '{key}': factors A{tuple(f.A.shape)} B{tuple(f.B.shape)} give a {shape} update, but the "
                    f"module is {known[key]} (A must be r×in, B out×r)"
                )
            if f.rank > min(shape):
                raise ValueError(
                    f"module '{key}': rank {f.rank} from A{tuple(f.A.shape)} B{tuple(f.B.shape)} exceeds "
                    f"min(out, in) = {min(shape)}: A and B look swapped (A must be r×in, B out×r)"
                )

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
        problem = factor_shape_problem(pair["A"], pair["B"])
        if problem:
            raise ValueError(f"module '{module}': {problem}")
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
