"""Robust product-space aggregation for untrusted devices: coordinate-wise median and trimmed mean.

The ΔW_k = s_k B_k A_k of each client are formed densely per key (robust statistics need the
coordinates), combined coordinate-wise — the median (Yin et al., "Byzantine-Robust Distributed
Learning", arXiv 1803.01498) or the β-trimmed mean that drops the ⌊βK⌋ largest and smallest values per
coordinate — and re-factorised like FlexLoRA (truncated SVD to each client's rank, remainder folded
into its base). Example counts are *not* used as weights: a malicious device could inflate them.
"""

from __future__ import annotations

import torch

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, aligned, counts
from aiflow_fl.aggregation.update import AdapterUpdate


def _combine(updates: list[AdapterUpdate], reduce) -> Aggregate:
    groups = aligned(updates)
    adapter = {}
    for key, g in groups.items():
        stacked = torch.stack([f.scaling * (f.B.double() @ f.A.double()) for f in g.factors])
        adapter[key] = lowrank.refactor_dense(reduce(stacked))
    return Aggregate(adapter=adapter, **counts(updates, groups), truncation="svd", fold_remainder=True)


def median(updates: list[AdapterUpdate]) -> Aggregate:
    """Coordinate-wise median of the products (mean of the two middle values for an even count)."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        ordered = x.sort(dim=0).values
        k = x.shape[0]
        return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])

    return _combine(updates, reduce)


def trimmed_mean(updates: list[AdapterUpdate], trim_fraction: float = 0.2) -> Aggregate:
    """Coordinate-wise mean after dropping the ⌊β·K⌋ largest and smallest values (β = trim_fraction)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")

    def reduce(x: torch.Tensor) -> torch.Tensor:
        cut = int(trim_fraction * x.shape[0])
        ordered = x.sort(dim=0).values
        return ordered[cut : x.shape[0] - cut].mean(dim=0)

    return _combine(updates, reduce)
