"""The hierarchical wrapper: put an edge tier (``strategies/edge.py``) under any aiflow-fl strategy.

``Hierarchical(FlexLoRA(min_clients=2), edge_rank=16, edge_rounds=2)`` keeps the wrapped strategy's
method and settings and groups its devices by edge: each edge merges its devices for ``edge_rounds``
Flower rounds (HierFAVG κ2, Liu et al., arXiv 1905.06641), then sends the cloud one update
re-factorised to ``edge_rank``; the cloud merges the edges with the same method. ``start(num_rounds=N)``
runs N cloud rounds.
"""

from __future__ import annotations

from aiflow_fl import comm
from strategies.base import HierarchySpec, LoraStrategy


class Hierarchical(LoraStrategy):
    """An aiflow-fl strategy with edge aggregators between its devices and the cloud."""

    def __init__(
        self,
        inner: LoraStrategy,
        edge_rank: int | None = 16,
        edge_rounds: int = 1,
        num_edges: int = 2,
        device_edge: comm.Link | None = None,
        edge_cloud: comm.Link | None = None,
    ) -> None:
        spec = HierarchySpec(edge_rank=edge_rank or None, edge_rounds=edge_rounds, num_edges=num_edges)
        if device_edge is not None:
            spec.device_edge = device_edge
        if edge_cloud is not None:
            spec.edge_cloud = edge_cloud
        super().__init__(
            method=inner.method,
            name=f"{inner.name}+edges",
            min_clients=inner.min_clients,
            fraction_train=inner.fraction_train,
            fraction_evaluate=inner.fraction_evaluate,
            min_available_nodes=inner.min_available_nodes,
            hierarchy=spec,
            device_cloud=inner.device_cloud,
            freeze_lora_a=inner.freeze_lora_a,
            global_rank=inner.global_rank,
            downlink=inner.downlink,
        )
        self.inner = inner
