"""Edge-then-cloud composition of aggregations (pure math; the stateful edge is ``strategies/edge.py``).

An edge runs the cloud's method on its own devices and sends the cloud **one** low-rank update: the
exact factors of everything it merged in this cloud round (the bases it accumulated over its
HierFAVG edge rounds plus its final adapter), re-factorised to at most ``edge_rank`` (Eckart–Young),
weighted by the examples of its devices. The cloud then aggregates the edges' updates with the same
method as if they were devices.

Why product-space methods compose exactly (ANCHORS §2): with ``p_k = (n_k/n_e)(n_e/N)``,
``Σ_e (n_e/N) Σ_{k∈e} (n_k/n_e) ΔW_k = Σ_k p_k ΔW_k`` — so FLoRA, FlexLoRA, FedEx-LoRA and FFA-LoRA give
the flat result for any grouping as long as ``edge_rank`` holds the edge's merged rank (≤ Σ_{k∈e} r_k).
FedIT and HetLoRA average factors: the cloud averages the edges' re-factorised factors (FedIT) or
weights them by norms that depend on the grouping (HetLoRA), so they do not.
"""

from __future__ import annotations

from collections.abc import Callable

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, Layers
from aiflow_fl.aggregation.update import AdapterUpdate

Method = Callable[[list[AdapterUpdate]], Aggregate]


def edge_update(agg: Aggregate, accumulated_base: Layers, edge_rank: int | None, member: str = "") -> AdapterUpdate:
    """The update an edge sends up: ``accumulated_base + agg.base + agg.adapter`` per key, ≤ ``edge_rank``.

    ``edge_rank = None`` or ``0`` means exact (the numerical rank). FFA-LoRA's factors are forwarded as
    they are when nothing was folded and they fit, so the cloud still sees the shared A.
    """
    max_rank = edge_rank or None
    layers = {}
    for key in sorted(set(agg.adapter) | set(agg.base) | set(accumulated_base)):
        parts = [p[key] for p in (accumulated_base, agg.base) if key in p]
        if key in agg.adapter:
            f = agg.adapter[key]
            if agg.keep_factors_upward and not parts and (max_rank is None or f.rank <= max_rank):
                layers[key] = f
                continue
            parts.append(f)
        layers[key] = lowrank.refactor([lowrank.scaled(f) for f in parts], max_rank)
    return AdapterUpdate(layers=layers, num_examples=agg.num_examples, member=member, key_examples=dict(agg.key_examples))


def hierarchical(groups: list[list[AdapterUpdate]], method: Method, edge_rank: int | None = None) -> Aggregate:
    """One cloud round with one edge round per edge: each group merged at its edge, then the edges at the cloud."""
    edges = [edge_update(method(devices), {}, edge_rank, member=f"edge-{i}") for i, devices in enumerate(groups)]
    return method(edges)
