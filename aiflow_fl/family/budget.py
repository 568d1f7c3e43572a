"""EESB parameter budget -> (exit layer, branch ratio) (paper §III-B2).

A member with exit k has: embeddings (+ an untied LM head) + final norm + k full decoder layers + a
branch (the layer's norms + every linear factorized at ratio r, rank ``rank_for_ratio``). The exit is
the last layer that still fits with the smallest branch (rank 1 everywhere); the branch ratio then
fills the rest of the budget as exactly as whole ranks allow (largest r that fits, found by
bisection: the branch size is a step function of r).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.spec import MemberSpec, check_architecture_config, check_exit, count_member, linear_shapes, skeleton
from aiflow_fl.family.svd import check_ratio, rank_for_ratio


@dataclass
class SizeModel:
    """Parameter counts of a backbone's parts, enough to size any EESB member."""

    fixed: int  # embeddings, final norm, untied LM head
    layer: int  # one full decoder layer
    branch_other: int  # a branch's non-linear parameters (norms, biases)
    linears: dict[str, tuple[int, int, bool]]  # linear name -> (out, in, bias)
    num_layers: int
    total: int

    def branch(self, ratio: float) -> int:
        return self.branch_other + sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n, _ in self.linears.values())

    def eesb(self, exit_layer: int, ratio: float) -> int:
        return self.fixed + exit_layer * self.layer + self.branch(ratio)

    @property
    def minimum(self) -> int:
        return self.eesb(0, 1e-9)


def size_model(config: PretrainedConfig) -> SizeModel:
    check_architecture_config(config)
    full = skeleton(config, MemberSpec("full", "full", exit=config.num_hidden_layers), {})
    total, _, blocks = count_member(full)
    layer = blocks // config.num_hidden_layers
    linears = linear_shapes(config)
    dense_linears = sum(m * n for m, n, _ in linears.values())
    return SizeModel(
        fixed=total - blocks,
        layer=layer,
        branch_other=layer - dense_linears,
        linears=linears,
        num_layers=config.num_hidden_layers,
        total=total,
    )


def exit_and_ratio(sizes: SizeModel, budget: int) -> tuple[int, float]:
    """The EESB (exit, ratio) whose member has the most parameters not above ``budget``."""
    if not sizes.minimum <= budget < sizes.total:
        raise AiflowError(
            f"An EESB budget of {budget:,} parameters is outside the allowed range [{sizes.minimum:,}, "
            f"{sizes.total:,}): the smallest member is the embeddings + final norm + a rank-1 branch of layer 0 "
            f"({sizes.minimum:,}), and a member must be smaller than the backbone ({sizes.total:,}; use 'full')."
        )
    exit_layer = max(k for k in range(sizes.num_layers) if sizes.eesb(k, 1e-9) <= budget)
    lo, hi = 1e-9, 1.0
    if sizes.eesb(exit_layer, 1.0) <= budget:
        return exit_layer, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sizes.eesb(exit_layer, mid) <= budget:
            lo = mid
        else:
            hi = mid
    return exit_layer, lo


def budget_from_fraction(sizes: SizeModel, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise AiflowError(
            f"A member budget fraction of {fraction!r} is outside the allowed range (0, 1) (a fraction of the "
            f"backbone's {sizes.total:,} parameters; the smallest possible member is "
            f"{sizes.minimum / sizes.total:.3f})."
        )
    return int(fraction * sizes.total)


def explicit_eesb(sizes: SizeModel, exit_layer: int, ratio: float) -> tuple[int, float]:
    """Validate a user-given (exit, ratio)."""
    check_exit(exit_layer, sizes.num_layers)
    return exit_layer, check_ratio(ratio, "branch ratio")
