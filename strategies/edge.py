"""The edge aggregator: merges its devices' low-rank updates between cloud rounds (HierFAVG).

Design (for the README)
-----------------------
* **Where it runs.** An :class:`EdgeAggregator` is a plain object owned by the hierarchical strategy in
  the ServerApp process (simulation and deployment alike): Flower's Grid reaches every SuperNode
  from the ServerApp, so the edge tier is a logical tier. Bytes and simulated time are nevertheless
  accounted per link as if each edge were its own machine (``aiflow_fl.comm``): the devices of an
  edge talk to it over the device↔edge link, and only the edge's factors cross the edge↔cloud link.
* **Grouping.** A device belongs to the edge named by ``edge-id`` in its reply's ``profile`` record
  (which comes from its node config); a device that does not say is put on edge
  ``node_id mod federation.num_edges``.
* **Rounds** (HierFAVG, Liu et al., arXiv 1905.06641): a cloud round is ``κ2 = hierarchy.edge_rounds``
  edge rounds. In each edge round the edge runs the cloud's method on its devices (weights
  ``n_k / n_e``) and hands them the result (its accumulated base plus the method's per-rank LoRA).
  After the last one it sends the cloud one update: the exact factors of everything it merged
  this cloud round, re-factorised to ``hierarchy.edge_rank`` (factors, never dense matrices, cross
  the edge→cloud link), weighted by ``n_e``. The cloud merges the edges with the same method.
* **Exactness.** Product-space methods compose exactly (``aiflow_fl.aggregation.hierarchy``): with
  ``edge_rank`` ≥ the edge's merged rank, edge-then-cloud equals the flat federation.
"""

from __future__ import annotations

from collections.abc import Callable

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, Layers
from aiflow_fl.aggregation.hierarchy import edge_update
from aiflow_fl.aggregation.update import AdapterUpdate


class EdgeAggregator:
    """One edge's state within a cloud round: what it has merged and what its devices start from."""

    def __init__(self, edge_id: str, method: Callable[[list[AdapterUpdate]], Aggregate], edge_rank: int | None) -> None:
        self.edge_id = edge_id
        self.method = method
        self.edge_rank = edge_rank
        self.reset()

    def reset(self) -> None:
        """Start a new cloud round: devices start from the cloud's state again."""
        self.accumulated: Layers = {}  # bases folded in earlier edge rounds of this cloud round
        self.last: Aggregate | None = None

    @property
    def active(self) -> bool:
        """True once the edge has merged at least once this cloud round (its devices follow it)."""
        return self.last is not None

    def aggregate(self, updates: list[AdapterUpdate]) -> Aggregate:
        """One edge round: the method over this edge's devices (their updates relative to the edge's base)."""
        if self.last is not None and self.last.base:
            self.accumulated = lowrank.add([self.accumulated, self.last.base])
        self.last = self.method(updates)
        return self.last

    def base(self) -> Layers:
        """The edge's cumulative base relative to the cloud's (what its devices fold in on top)."""
        if self.last is None:
            return {}
        return lowrank.add([self.accumulated, self.last.base]) if self.last.base else self.accumulated

    def model_delta(self) -> Layers:
        """Everything this edge merged this cloud round, exactly (no truncation): what its devices hold on
        top of the cloud's base — an edge's specialist (``aiflow_fl.collab.specialists``)."""
        if self.last is None:
            raise RuntimeError(f"edge {self.edge_id} has merged nothing this cloud round")
        return lowrank.add([self.accumulated, self.last.base, self.last.adapter])

    def upward(self) -> AdapterUpdate:
        """The one update this edge sends the cloud at the end of a cloud round."""
        if self.last is None:
            raise RuntimeError(f"edge {self.edge_id} has merged nothing this cloud round")
        return edge_update(self.last, self.accumulated, self.edge_rank, member=f"edge:{self.edge_id}")
