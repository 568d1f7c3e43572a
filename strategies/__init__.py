"""Flower Message-API strategies for aligned low-rank updates, one module per method, plus the edge tier.

Build one from the typed config::

    from aiflow_fl.config import load_config
    from strategies import build_strategy

    strategy = build_strategy(load_config(["strategy=flexlora", "hierarchy.enabled=true"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.federation.rounds,
                            train_config=ConfigRecord({...}))

``build_strategy(cfg, *, fraction_evaluate=0.0) -> LoraStrategy`` is the stable entry point (the
ServerApp calls it): ``cfg.strategy`` picks the method (``STRATEGIES``), ``cfg.federation`` gives
``min_clients``, ``fraction_train``, ``num_edges``, ``global_rank`` (0: the largest of
``federation.ranks``) and ``downlink``, and ``cfg.hierarchy`` (``enabled``, ``edge_rank``,
``edge_rounds``, link bandwidths and latencies) wraps it in :class:`Hierarchical`. ``num_rounds`` given
to ``start`` counts cloud rounds. Per-round metrics (bytes per link, simulated time, clients ok/failed)
are in the returned ``Result.train_metrics_clientapp`` and in ``strategy.history``.

Every strategy sends, per node, the records of ``aiflow_fl/protocol.py`` plus these ``config`` keys:
``server-round``, ``edge-round``, ``method``, ``reinit-lora`` (start from a fresh LoRA when the
``lora`` record is empty) and ``freeze-lora-a`` (FFA-LoRA: do not train A).
"""

from __future__ import annotations

from typing import Any

from aiflow_fl import comm
from aiflow_fl.config import AiflowConfig
from aiflow_fl.errors import AiflowError
from strategies.base import HierarchySpec, LoraStrategy, NodeProfile
from strategies.fedavg import FedAvgProducts
from strategies.fedexlora import FedExLoRA
from strategies.fedit import FedIT
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.hierarchical import Hierarchical
from strategies.robust import Median, TrimmedMean

STRATEGIES: dict[str, type[LoraStrategy]] = {
    "fedavg": FedAvgProducts,
    "fedit": FedIT,
    "ffa": FFALoRA,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "hetlora": HetLoRA,
    "fedexlora": FedExLoRA,
    "median": Median,
    "trimmed_mean": TrimmedMean,
}


def build_strategy(cfg: AiflowConfig, *, fraction_evaluate: float = 0.0) -> LoraStrategy:
    """The strategy the config asks for (see the module docstring). Raises AiflowError on bad values."""
    if cfg.strategy not in STRATEGIES:
        raise AiflowError(f"strategy is '{cfg.strategy}', which is not one of: {', '.join(STRATEGIES)}.")
    fed, h = cfg.federation, cfg.hierarchy
    device_edge = comm.check_link("device_edge", h.device_edge_mbps, h.device_edge_latency_ms)
    edge_cloud = comm.check_link("edge_cloud", h.edge_cloud_mbps, h.edge_cloud_latency_ms)
    kwargs: dict[str, Any] = dict(
        min_clients=fed.min_clients,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_available_nodes=fed.min_clients,
        device_cloud=device_edge.then(edge_cloud),
        # the configured ranks bound the global adapter's (it must not grow round after round)
        global_rank=fed.global_rank or max(fed.ranks or [cfg.lora.rank]),
        downlink=fed.downlink,
    )
    if cfg.strategy == "trimmed_mean":
        if not 0.0 <= h.trim_fraction < 0.5:
            raise AiflowError(f"hierarchy.trim_fraction is {h.trim_fraction}; it must be in [0, 0.5).")
        kwargs["trim_fraction"] = h.trim_fraction
    strategy = STRATEGIES[cfg.strategy](**kwargs)
    if not h.enabled:
        return strategy
    if h.edge_rounds < 1:
        raise AiflowError(f"hierarchy.edge_rounds is {h.edge_rounds}; it must be ≥ 1 (HierFAVG κ2).")
    if h.edge_rank < 0:
        raise AiflowError(f"hierarchy.edge_rank is {h.edge_rank}; it must be ≥ 0 (0 means exact, no truncation).")
    if fed.num_edges < 1:
        raise AiflowError(f"federation.num_edges is {fed.num_edges}; it must be ≥ 1 when hierarchy.enabled is true.")
    return Hierarchical(
        strategy, edge_rank=h.edge_rank, edge_rounds=h.edge_rounds, num_edges=fed.num_edges, device_edge=device_edge, edge_cloud=edge_cloud
    )


__all__ = ["STRATEGIES", "build_strategy", "LoraStrategy", "Hierarchical", "HierarchySpec", "NodeProfile", *[c.__name__ for c in STRATEGIES.values()]]
