"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
arXiv 2401.06432).

Zero-pad every client's factors to the largest rank, average them with *sparsity* weights
``w_k ∝ n_k · ‖s_k B_k A_k‖_F`` (updates that moved more count more; the example counts keep
the method comparable with the others), and send each client the first ``r_k`` components back
(rank truncation). Like FedIT it averages factors, so the merged product is not
``Σ p_k s_k B_k A_k`` and, because the weights depend on the updates' norms, an edge-then-cloud
merge differs from the flat one. The paper's local rank self-pruning is a client-side option and not
part of the aggregation.
"""

from __future__ import annotations

import torch

from aiflow_fl.aggregation.common import Aggregate, aligned, padded_mean, counts
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors


def frobenius_norm(f: LoraFactors) -> float:
    """‖s B A‖_F from the r×r Gram matrices: ‖BA‖_F² = tr((BᵀB)(AAᵀ))."""
    B, A = f.B.double(), f.A.double()
    return abs(f.scaling) * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    adapter = {}
    for key, g in groups.items():
        raw = [w * frobenius_norm(f) for f, w in zip(g.factors, g.weights)]
        total = sum(raw)
        weights = [r / total for r in raw] if total > 0 else g.weights
        adapter[key] = padded_mean(g, weights)
    return Aggregate(adapter=adapter, **counts(updates, groups), truncation="prefix")
