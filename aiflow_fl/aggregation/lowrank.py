"""Low-rank building blocks shared by every aggregation method.

All merges are done in *product space* without forming an m×n matrix when it can be avoided:
a weighted sum ``Σ_k w_k s_k B_k A_k`` is the product of the stacked factors
``[w_1 s_1 B_1 … w_K s_K B_K] · [A_1; …; A_K]`` (FLoRA's observation, arXiv 2409.05976), and such a
stack is re-factorised to its numerical rank (or truncated to a target rank, Eckart–Young) by a QR of
each side and an SVD of the small core:

    B_cat = Q_b R_b,   A_catᵀ = Q_a R_a,   R_b R_aᵀ = U Σ Vᵀ
    B_cat A_cat = (Q_b U Σ^½)(Σ^½ Vᵀ Q_aᵀ)

which costs O((m+n)R²) instead of O(mn·min(m,n)). Factors produced here carry ``scaling = 1``.
"""

from __future__ import annotations

import torch

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors

# Singular values below this fraction of the largest are numerical noise of float32 factors.
RELATIVE_TOLERANCE = 1e-6


def scaled(f: LoraFactors, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight·scaling·B, A) in float64: the pair whose product is ``weight·ΔW``."""
    return (weight * f.scaling) * f.B.double(), f.A.double()


def stack(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (B_i, A_i) pairs so that B A = Σ_i B_i A_i (ranks add up)."""
    return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs], dim=0)


def refactor(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    max_rank: int | None = None,
    tolerance: float = RELATIVE_TOLERANCE,
) -> LoraFactors:
    """Best rank-``max_rank`` factors (B Σ^½, Σ^½ A, scaling 1) of ``Σ_i B_i A_i``.

    Without ``max_rank`` the result is exact up to ``tolerance`` (its rank is the numerical rank of
    the sum); with it, the truncation is the Eckart–Young optimum in Frobenius norm. Always returns at
    least rank 1 (a zero pair when the sum is zero) so shapes stay valid on the wire.
    """
    B, A = stack(pairs)
    out_features, in_features = B.shape[0], A.shape[1]
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    keep = int((s > tolerance * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if max_rank is not None:
        keep = min(keep, max_rank)
    if keep == 0:
        return LoraFactors(torch.zeros(1, in_features), torch.zeros(out_features, 1), 1.0)
    root = s[:keep].sqrt()
    new_B = (qb @ u[:, :keep]) * root
    new_A = root[:, None] * (vh[:keep] @ qa.T)
    return LoraFactors(new_A.float(), new_B.float(), 1.0)


def refactor_dense(delta: torch.Tensor, max_rank: int | None = None, tolerance: float = RELATIVE_TOLERANCE) -> LoraFactors:
    """Factors of a dense m×n update (used only by the robust methods, which must go dense)."""
    return refactor([(delta.double(), torch.eye(delta.shape[1], dtype=torch.float64))], max_rank, tolerance)


def pad_rank(f: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (scaling·B, A) to ``rank`` (HetLoRA, arXiv 2401.06432): the product is unchanged."""
    B, A = scaled(f)
    extra = rank - A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[0]} down to {rank}")
    return torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1), torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0)


def first_components(f: LoraFactors, rank: int) -> LoraFactors:
    """Keep the first ``rank`` rank-one components (HetLoRA's truncation; exact if rank ≥ f.rank)."""
    return LoraFactors(f.A[:rank].clone(), f.B[:, :rank].clone(), f.scaling)


def with_scaling(f: LoraFactors, scaling: float) -> LoraFactors:
    """The same ΔW expressed with another scaling (B is divided by it), e.g. a client's alpha/r."""
    return LoraFactors(f.A.clone(), (f.B.double() * (f.scaling / scaling)).float(), scaling)


def concat(parts: list[LoraFactors]) -> LoraFactors:
    """Components side by side (ranks add, scaling folded into B): the product is the sum, exactly,
    and the first part's components stay first (so a client's own components keep their index)."""
    B = torch.cat([f.scaling * f.B.float() for f in parts], dim=1)
    A = torch.cat([f.A.float() for f in parts], dim=0)
    return LoraFactors(A, B, 1.0)


def difference(full: LoraFactors, part: LoraFactors) -> LoraFactors:
    """Exact factors of ``full.delta() − part.delta()`` (what a client's rank cannot hold)."""
    b, a = scaled(part)
    return refactor([scaled(full), (-b, a)])


def add(parts: list[dict[str, LoraFactors]], max_rank: int | None = None) -> dict[str, LoraFactors]:
    """Key-wise exact sum of several factor dicts (keys present in any of them), re-factorised.

    A key held by a single part is returned as it is when no truncation is asked for (it was
    re-factorised when it was made), which keeps the common per-round case cheap.
    """
    keys = sorted({k for p in parts for k in p})
    out = {}
    for k in keys:
        present = [p[k] for p in parts if k in p]
        out[k] = present[0] if len(present) == 1 and max_rank is None else refactor([scaled(f) for f in present], max_rank)
    return out


def dense(layers: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """ΔW per key, float64 (for tests, benchmarks and the robust methods)."""
    return {k: f.scaling * (f.B.double() @ f.A.double()) for k, f in layers.items()}


def total_rank(update: AdapterUpdate) -> int:
    return sum(f.rank for f in update.layers.values())
