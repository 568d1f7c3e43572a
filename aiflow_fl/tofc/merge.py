"""DPC-KNN token merging (paper §II-B1 "Details"; TCFormer's ``cluster_dpc_knn``, Zeng et al. 2022).

For the N visual tokens x_1..x_N (C channels) of one image:

* distances d_ij = ‖x_i − x_j‖ / √C (TCFormer scales by √C so k-NN densities do not depend on width);
* local density ρ_i = exp(−mean_{j ∈ kNN(i)} d_ij²), where kNN(i) are the k smallest d_ij *including
  the token itself* (d_ii = 0), as TCFormer's ``topk`` does;
* δ_i = min_{j: ρ_j > ρ_i} d_ij, and for the densest token δ = max_ij d_ij (so it can be a centre);
* the n_c centres are the tokens with the largest ρ_i·δ_i (in that order);
* every token joins its nearest centre, and each centre is forced into its own cluster;
* merged token c = plain mean of its cluster's tokens (the TOFC digest: no learned token weights).

Ties in ρ are broken deterministically (a tiny index-proportional offset, instead of TCFormer's random
noise) so that a device and a test always pick the same centres.
"""

from __future__ import annotations

import torch

from aiflow_fl.errors import AiflowError

TIE_EPS = 1e-6


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """d_ij = ‖x_i − x_j‖ / √C for x of shape (B, N, C) → (B, N, N)."""
    return torch.cdist(x, x) / (x.shape[-1] ** 0.5)


def local_density(dist: torch.Tensor, k: int) -> torch.Tensor:
    """ρ_i = exp(−mean of the k smallest squared distances of row i), plus the tie-break offset."""
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest**2).mean(dim=-1)).exp()
    n = dist.shape[-1]
    return density + TIE_EPS * torch.arange(n, dtype=dist.dtype, device=dist.device) / n


def distance_to_denser(dist: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """δ_i = distance to the nearest strictly denser token; the densest token gets max_ij d_ij."""
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: ρ_j > ρ_i
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    return torch.where(denser, dist, far.expand_as(dist)).min(dim=-1).values


def dpc_knn_clusters(x: torch.Tensor, n_clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster tokens x (B, N, C): returns (assignment (B, N) in [0, n_c), centre indices (B, n_c))."""
    if x.dim() != 3:
        raise AiflowError(f"DPC-KNN expects tokens of shape (batch, tokens, channels), got {tuple(x.shape)}.")
    batch, n, _ = x.shape
    if not 1 <= n_clusters <= n:
        raise AiflowError(f"DPC-KNN: n_clusters must be in [1, {n}] (the number of tokens), got {n_clusters}.")
    k = min(k, n)
    with torch.no_grad():
        dist = pairwise_distances(x.float())
        density = local_density(dist, k)
        delta = distance_to_denser(dist, density)
        centres = torch.topk(density * delta, k=n_clusters, dim=-1).indices  # (B, n_c)
        to_centres = torch.gather(dist, 1, centres[:, :, None].expand(batch, n_clusters, n))  # (B, n_c, N)
        assignment = to_centres.argmin(dim=1)  # (B, N)
        rows = torch.arange(batch, device=x.device)[:, None]
        assignment[rows, centres] = torch.arange(n_clusters, device=x.device)[None, :]
    return assignment, centres


def merge_by_mean(x: torch.Tensor, assignment: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Cluster means: (B, N, C) tokens and (B, N) assignment → (B, n_c, C)."""
    batch, _, channels = x.shape
    sums = x.new_zeros(batch, n_clusters, channels).scatter_add_(1, assignment[:, :, None].expand_as(x), x)
    counts = x.new_zeros(batch, n_clusters).scatter_add_(1, assignment, torch.ones_like(assignment, dtype=x.dtype))
    return sums / counts.clamp(min=1)[:, :, None]


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, k: int = 5) -> torch.Tensor:
    """DPC-KNN: N tokens → n_c merged tokens (module docstring)."""
    assignment, _ = dpc_knn_clusters(x, n_clusters, k)
    return merge_by_mean(x, assignment, n_clusters)
