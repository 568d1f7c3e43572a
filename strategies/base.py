"""The Message-API strategy shared by every aiflow-fl method: per-node messages, faults, edges, bytes.

:class:`LoraStrategy` is a ``flwr.serverapp.strategy.Strategy`` whose aggregation rule is a pure
function ``method(updates) -> Aggregate`` from :mod:`aiflow_fl.aggregation`; the modules next to this
one bind each method to a named class. Everything Flower-specific lives here and stays thin:

* **Per-node messages** (wire contract: ``aiflow_fl/protocol.py``). Each node's first reply tells the
  server its profile (``member``, ``edge-id``, ``lora-rank``, ``lora-alpha``) and the keys its member
  trains; from then on it receives only those keys, its ``base`` (the server's cumulative base plus
  what its rank cannot hold, as factors) and its ``lora`` init at its own rank. A node the server has
  not heard from yet gets every key, with the whole adapter folded into its base and no LoRA
  (so it starts exactly from the server's model with a fresh adapter).
* **Faults.** A reply that carries an error, or whose records are malformed (missing ``lora`` or
  ``num-examples``, NaN/Inf, factor shapes that do not match the key's known shape), is logged and
  left out; fewer than ``min_clients`` good replies stop the run with an :class:`AiflowError`.
* **Hierarchy.** With ``hierarchy`` set, devices are grouped by edge and merged at their
  :class:`strategies.edge.EdgeAggregator` for ``edge_rounds`` Flower rounds, then the cloud merges the
  edges (see ``strategies/edge.py``). :meth:`start` takes ``num_rounds`` in *cloud* rounds.
* **Communication.** Every message's serialized size is added to its link; each round's metrics
  carry ``bytes/<link>``, ``cloud-bytes`` and ``sim-round-s`` (from the configured links and the
  devices' reported ``train-time-s``); :attr:`history` keeps them for plots and benchmarks.

The ``arrays`` Flower passes between rounds is the server's merged update (``base + adapter`` as
factors, keyed ``<module>::A|B|scaling``): save it as a checkpoint, or pass it back as
``initial_arrays`` to resume (it becomes the starting base).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, sample_nodes
from flwr.supercore import log

from aiflow_fl import comm
from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, Layers
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.errors import AiflowError
from aiflow_fl.protocol import BASE, CONFIG, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, update_to_arrays
from strategies.edge import EdgeAggregator

Method = Callable[[list[AdapterUpdate]], Aggregate]


@dataclass
class NodeProfile:
    """What the server knows about a node, learned from its replies' ``profile`` record and keys."""

    member: str = ""
    edge_id: str = ""
    rank: int | None = None
    alpha: float | None = None
    keys: set[str] | None = None
    partition_id: int | None = None  # the device's data partition (from its profile record)

    @property
    def scaling(self) -> float:
        return (self.alpha / self.rank) if (self.alpha and self.rank) else 1.0


@dataclass
class HierarchySpec:
    """Edge tier settings (config section ``hierarchy``)."""

    edge_rank: int | None = 16  # None: exact
    edge_rounds: int = 1
    num_edges: int = 2  # used only for devices that report no edge-id
    device_edge: comm.Link = field(default_factory=lambda: comm.Link(20.0, 20.0))
    edge_cloud: comm.Link = field(default_factory=lambda: comm.Link(100.0, 40.0))


class LoraStrategy(Strategy):
    """Federated fine-tuning of aligned low-rank adapters with one aggregation ``method``.

    Parameters
    ----------
    method : the pure aggregation rule (``aiflow_fl.aggregation.METHODS[name]``).
    name : a label for logs and metrics.
    min_clients : fewer good replies than this in a round is an error.
    fraction_train, fraction_evaluate : share of connected nodes sampled per round (evaluate 0: skip).
    min_available_nodes : wait for this many connected nodes before sampling.
    hierarchy : edge tier settings, or None for a flat federation.
    device_cloud : the flat federation's device↔cloud link (default: device→edge→cloud path).
    freeze_lora_a : tell clients to keep LoRA A frozen (FFA-LoRA).
    """

    def __init__(
        self,
        method: Method,
        name: str = "lora",
        min_clients: int = 1,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int = 1,
        hierarchy: HierarchySpec | None = None,
        device_cloud: comm.Link | None = None,
        freeze_lora_a: bool = False,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise AiflowError(f"federation.fraction_train is {fraction_train}; it must be in (0, 1].")
        if min_clients < 1:
            raise AiflowError(f"federation.min_clients is {min_clients}; it must be ≥ 1.")
        if hierarchy is not None and hierarchy.edge_rounds < 1:
            raise AiflowError(f"hierarchy.edge_rounds is {hierarchy.edge_rounds}; it must be ≥ 1.")
        if hierarchy is not None and hierarchy.edge_rank is not None and hierarchy.edge_rank < 0:
            raise AiflowError(f"hierarchy.edge_rank is {hierarchy.edge_rank}; it must be ≥ 0 (0: exact).")
        self.method = method
        self.name = name
        self.min_clients = min_clients
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_available_nodes = max(min_available_nodes, min_clients)
        self.hierarchy = hierarchy
        default_links = HierarchySpec()
        self.device_cloud = device_cloud or default_links.device_edge.then(default_links.edge_cloud)
        self.freeze_lora_a = freeze_lora_a
        # Server state: the cloud's cumulative base (relative to the frozen weights) and last aggregate.
        self.base: Layers = {}
        self.cloud: Aggregate | None = None
        self.edges: dict[str, EdgeAggregator] = {}
        self.profiles: dict[int, NodeProfile] = {}
        self.shapes: dict[str, tuple[int, int]] = {}  # key -> (out, in), learned from good replies
        self.history: list[dict[str, Any]] = []  # per Flower round: comm figures and fault counts
        self.reply_metrics: dict[int, dict[int, dict[str, float]]] = {}  # Flower round -> node -> its good reply's metrics
        self._sent_extra: dict[int, Layers] = {}  # what each node got folded into its base this round
        self._round: dict[str, Any] = {}
        self._cache: dict[tuple, tuple[Layers, Layers, Layers]] = {}  # per (tier, rank, scaling), see node_records

    # ----------------------------------------------------------------- Flower entry point
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run ``num_rounds`` cloud rounds (each = ``hierarchy.edge_rounds`` Flower rounds).

        ``initial_arrays``: a previous run's merged update (resume) or an empty ArrayRecord.
        """
        if initial_arrays is not None and len(initial_arrays) > 0:
            try:
                self.base = arrays_to_update(initial_arrays).layers
            except ValueError as exc:
                raise AiflowError(
                    f"The starting update (a checkpoint to resume from) is not an aiflow-fl adapter record "
                    f"(keys '<module>::A|B|scaling'): {exc}. Resume from a checkpoint this strategy wrote."
                ) from None
        rounds = num_rounds * (self.hierarchy.edge_rounds if self.hierarchy else 1)
        return super().start(grid=grid, initial_arrays=initial_arrays or ArrayRecord(), num_rounds=rounds, **kwargs)

    def summary(self) -> None:
        log(INFO, "\t├──> method: %s, min clients: %d, fraction train: %.2f", self.name, self.min_clients, self.fraction_train)
        if self.hierarchy:
            h = self.hierarchy
            log(INFO, "\t└──> hierarchy: edge rank %s, %d edge round(s) per cloud round", h.edge_rank or "exact", h.edge_rounds)
        else:
            log(INFO, "\t└──> flat federation (no edge tier)")

    # ----------------------------------------------------------------- round bookkeeping
    def _edge_round(self, server_round: int) -> tuple[int, bool]:
        """(edge round within the cloud round, 1-based; whether this Flower round ends a cloud round)."""
        k = self.hierarchy.edge_rounds if self.hierarchy else 1
        j = (server_round - 1) % k + 1
        return j, j == k

    def _edge_of(self, node_id: int) -> str:
        profile = self.profiles.get(node_id)
        if profile is not None and profile.edge_id:
            return profile.edge_id
        assert self.hierarchy is not None
        return f"edge-{node_id % max(1, self.hierarchy.num_edges)}"

    def _edge(self, edge_id: str) -> EdgeAggregator:
        if edge_id not in self.edges:
            assert self.hierarchy is not None
            self.edges[edge_id] = EdgeAggregator(edge_id, self.method, self.hierarchy.edge_rank)
        return self.edges[edge_id]

    # ----------------------------------------------------------------- downlink
    def node_records(self, node_id: int) -> tuple[ArrayRecord, ArrayRecord, Layers]:
        """(base, lora, extra) for one node: extra is what was folded beyond its tier's reference.

        The per-key work (truncation to the node's rank, the remainder, the cumulative base) depends
        only on the tier, the rank and the scaling, so it is done once per such group and cached
        until the next aggregation; nodes then take their keys from it.
        """
        profile = self.profiles.get(node_id, NodeProfile())
        keys = profile.keys
        tier = "cloud"
        parts = [self.base]
        agg = self.cloud
        if self.hierarchy is not None:
            edge = self._edge(self._edge_of(node_id))
            if edge.active:
                tier = edge.edge_id
                parts.append(edge.base())
                agg = edge.last
        group = (tier, profile.rank, profile.scaling)
        if group not in self._cache:
            extra_all: Layers = {}
            lora_all: Layers = {}
            if agg is not None:
                extra_all, lora_all = agg.for_rank(profile.rank, profile.scaling)
            self._cache[group] = (lowrank.add([*parts, extra_all]), lora_all, extra_all)
        base_all, lora_all, extra_all = self._cache[group]
        pick = lambda layers: {k: f for k, f in layers.items() if keys is None or k in keys}  # noqa: E731
        extra = pick(extra_all)
        return (
            update_to_arrays(AdapterUpdate(pick(base_all), 0)),
            update_to_arrays(AdapterUpdate(pick(lora_all), 0)),
            extra,
        )

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float, kind: str) -> list[Message]:
        num_nodes = len(list(grid.get_node_ids()))
        sample_size = max(int(num_nodes * fraction), self.min_clients)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        edge_round, _ = self._edge_round(server_round)
        reinit = bool(self._active_reinit())
        messages = []
        for node_id in node_ids:
            base, lora, extra = self.node_records(node_id)
            node_config = ConfigRecord(dict(config))
            node_config.update(
                {
                    "server-round": server_round,
                    "edge-round": edge_round,
                    "method": self.name,
                    "reinit-lora": reinit,
                    "freeze-lora-a": self.freeze_lora_a,
                }
            )
            content = RecordDict({BASE: base, LORA: lora, CONFIG: node_config})
            if kind == MessageType.TRAIN:
                self._sent_extra[node_id] = extra
                self._count(self._down_link(), node_id, comm.serialized_bytes(content))
            messages.append(Message(content=content, message_type=kind, dst_node_id=node_id))
        return messages

    def _active_reinit(self) -> bool:
        return self.cloud is not None and self.cloud.reinit_lora

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        edge_round, _ = self._edge_round(server_round)
        t0 = time.perf_counter()
        self._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": t0}
        self._sent_extra = {}
        if self.hierarchy is not None and edge_round == 1:
            for edge in self.edges.values():
                edge.reset()
        self._cache = {}
        messages = self._messages(server_round, config, grid, self.fraction_train, MessageType.TRAIN)
        if self.hierarchy is not None and edge_round == 1:
            self._count_cloud_to_edges([m.metadata.dst_node_id for m in messages])
        self._round["server_s"] = time.perf_counter() - t0
        return messages

    def _down_link(self) -> str:
        return comm.EDGE_TO_DEVICE if self.hierarchy else comm.CLOUD_TO_DEVICE

    def _up_link(self) -> str:
        return comm.DEVICE_TO_EDGE if self.hierarchy else comm.DEVICE_TO_CLOUD

    def _count(self, link: str, node_id: int, num_bytes: int) -> None:
        self._round["bytes"][link] += num_bytes
        side = "down" if link in (comm.EDGE_TO_DEVICE, comm.CLOUD_TO_DEVICE) else "up"
        self._round[side][node_id] = self._round[side].get(node_id, 0) + num_bytes

    def _count_cloud_to_edges(self, node_ids: list[int]) -> None:
        """What the cloud sends each edge at the start of a cloud round: its base and adapter, for the
        keys the edge's devices use (the edge derives every device's per-rank records from them)."""
        per_edge: dict[str, list[int]] = {}
        for node_id in node_ids:
            per_edge.setdefault(self._edge_of(node_id), []).append(node_id)
        self._round["cloud_to_edge"] = {}
        for edge_id, nodes in per_edge.items():
            keys: set[str] | None = set()
            for n in nodes:
                p = self.profiles.get(n)
                if p is None or p.keys is None:
                    keys = None
                    break
                keys |= p.keys  # type: ignore[operator]
            pick = lambda layers: {k: f for k, f in layers.items() if keys is None or k in keys}  # noqa: E731
            adapter = pick(self.cloud.adapter) if self.cloud else {}
            content = RecordDict({BASE: update_to_arrays(AdapterUpdate(pick(self.base), 0)), LORA: update_to_arrays(AdapterUpdate(adapter, 0))})
            size = comm.serialized_bytes(content)
            self._round["bytes"][comm.CLOUD_TO_EDGE] += size
            self._round["cloud_to_edge"][edge_id] = size

    # ----------------------------------------------------------------- uplink
    def parse_reply(self, reply: Message) -> AdapterUpdate | None:
        """A good reply's update relative to its tier's reference, or None (logged) if it is bad."""
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "%s: node %d replied with an error and is left out: %s", self.name, node_id, reply.error.reason)
            return None
        content = reply.content
        try:
            if LORA not in content or METRICS not in content:
                raise ValueError(f"reply lacks the '{LORA}' or '{METRICS}' record")
            num_examples = content[METRICS].get(NUM_EXAMPLES)
            if not isinstance(num_examples, (int, float)) or num_examples <= 0:
                raise ValueError(f"'{NUM_EXAMPLES}' is {num_examples!r}, not a positive number")
            update = arrays_to_update(content[LORA], int(num_examples))
            if not update.layers:
                raise ValueError("the 'lora' record holds no module")
            update.check_shapes(self.shapes)  # names the key and the shapes (swapped factors, wrong module)
            for key, f in update.layers.items():
                if not torch.isfinite(torch.tensor(f.scaling)):
                    raise ValueError(f"module '{key}' has a non-finite scaling")
        except (ValueError, KeyError, TypeError) as exc:
            log(WARNING, "%s: node %d sent a malformed reply and is left out: %s", self.name, node_id, exc)
            return None
        for key, f in update.layers.items():
            self.shapes[key] = (f.B.shape[0], f.A.shape[1])
        profile = self.profiles.setdefault(node_id, NodeProfile())
        if PROFILE in content:
            p = content[PROFILE]
            profile.member = str(p.get("member", profile.member))
            profile.edge_id = str(p.get("edge-id", profile.edge_id))
            if p.get("partition-id") is not None:
                profile.partition_id = int(p.get("partition-id"))
            rank, alpha = p.get("lora-rank"), p.get("lora-alpha")
            profile.rank = int(rank) if rank else max(f.rank for f in update.layers.values())
            profile.alpha = float(alpha) if alpha else None
        else:
            profile.rank = max(f.rank for f in update.layers.values())
        if profile.alpha is None:
            first = next(iter(update.layers.values()))
            profile.alpha = first.scaling * first.rank
        profile.keys = set(update.layers)
        update.member = profile.member
        update.metrics = {k: float(v) for k, v in content[METRICS].items() if isinstance(v, (int, float))}
        # The node's adapter relative to its tier's base: its factors plus what was folded into its base.
        extra = self._sent_extra.get(node_id, {})
        for key in list(update.layers):
            if key in extra:
                update.layers[key] = lowrank.concat([update.layers[key], extra[key]])
        return update

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        self._cache = {}  # the state changes below
        replies = list(replies)
        good: dict[int, AdapterUpdate] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if not reply.has_error():
                self._count(self._up_link(), node_id, comm.serialized_bytes(reply.content))
            update = self.parse_reply(reply)
            if update is not None:
                good[node_id] = update
                self.reply_metrics.setdefault(server_round, {})[node_id] = dict(update.metrics)
        failed = len(replies) - len(good)
        if len(good) < self.min_clients:
            raise AiflowError(
                f"Round {server_round} of strategy '{self.name}': only {len(good)} of {len(replies)} clients sent a "
                f"usable update ({failed} failed or were malformed; see the log), fewer than "
                f"federation.min_clients = {self.min_clients}. Lower federation.min_clients or fix the failing clients."
            )
        edge_round, cloud_round_ends = self._edge_round(server_round)
        if self.hierarchy is None:
            self._apply_cloud(self.method(list(good.values())))
        else:
            by_edge: dict[str, list[AdapterUpdate]] = {}
            for node_id, update in good.items():
                by_edge.setdefault(self._edge_of(node_id), []).append(update)
            for edge_id, updates in by_edge.items():
                self._edge(edge_id).aggregate(updates)
            if cloud_round_ends:
                ups = {edge_id: edge.upward() for edge_id, edge in self.edges.items() if edge.active}
                self._round["edge_to_cloud"] = {}
                for edge_id, up in ups.items():
                    content = RecordDict(
                        {
                            LORA: update_to_arrays(up),
                            METRICS: MetricRecord({NUM_EXAMPLES: up.num_examples}),
                            "key-examples": ConfigRecord({k: int(v) for k, v in (up.key_examples or {}).items()}),
                        }
                    )
                    size = comm.serialized_bytes(content)
                    self._round["bytes"][comm.EDGE_TO_CLOUD] += size
                    self._round["edge_to_cloud"][edge_id] = size
                self._apply_cloud(self.method(list(ups.values())))
        merged = self.merged() if (self.hierarchy is None or cloud_round_ends) else None
        arrays = update_to_arrays(AdapterUpdate(merged, 0)) if merged is not None else None
        self._round["server_s"] = self._round.get("server_s", 0.0) + time.perf_counter() - t0
        metrics = self._round_metrics(server_round, good, failed, [r for r in replies if not r.has_error()])
        return arrays, metrics

    def _apply_cloud(self, agg: Aggregate) -> None:
        if agg.base:
            self.base = lowrank.add([self.base, agg.base])
        self.cloud = agg

    def merged(self) -> Layers:
        """The server's model as factors: cumulative base plus the current adapter, per key."""
        return lowrank.add([self.base, self.cloud.adapter if self.cloud else {}])

    # ----------------------------------------------------------------- metrics
    def _round_metrics(self, server_round: int, good: dict[int, AdapterUpdate], failed: int, ok_replies: list[Message]) -> MetricRecord:
        b = self._round["bytes"]
        train_s = {n: u.metrics.get("train-time-s", 0.0) for n, u in good.items()}
        if self.hierarchy is None:
            link = self.device_cloud
            sim = max(
                (link.seconds(self._round["down"].get(n, 0)) + train_s.get(n, 0.0) + link.seconds(self._round["up"].get(n, 0)) for n in good),
                default=0.0,
            )
        else:
            h = self.hierarchy
            per_edge: dict[str, float] = {}
            for n in good:
                t = h.device_edge.seconds(self._round["down"].get(n, 0)) + train_s.get(n, 0.0) + h.device_edge.seconds(self._round["up"].get(n, 0))
                e = self._edge_of(n)
                per_edge[e] = max(per_edge.get(e, 0.0), t)
            for e in per_edge:
                per_edge[e] += h.edge_cloud.seconds(self._round.get("cloud_to_edge", {}).get(e, 0))
                per_edge[e] += h.edge_cloud.seconds(self._round.get("edge_to_cloud", {}).get(e, 0))
            sim = max(per_edge.values(), default=0.0)
        cloud_bytes = sum(b[link] for link in comm.CLOUD_LINKS)
        figures: dict[str, Any] = {
            "server-round": server_round,
            "clients-ok": len(good),
            "clients-failed": failed,
            "cloud-bytes": cloud_bytes,
            "sim-round-s": sim,
            "round-s": time.perf_counter() - self._round["t0"],
            "server-s": self._round.get("server_s", 0.0),  # the strategy's own compute (messages, merges, counting)
            **{f"bytes/{link}": b[link] for link in comm.LINKS},
        }
        self.history.append(figures)
        record = MetricRecord({k: (float(v) if isinstance(v, float) else int(v)) for k, v in figures.items()})
        if ok_replies:
            usable = [r.content for r in ok_replies if r.metadata.src_node_id in good]
            try:
                for k, v in aggregate_metricrecords(usable, NUM_EXAMPLES).items():
                    if k not in record:
                        record[k] = v
            except (ValueError, KeyError, TypeError) as exc:  # clients' metrics differ; keep ours
                log(WARNING, "%s: could not average the clients' metrics: %s", self.name, exc)
        return record

    # ----------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0.0:
            return []
        _, cloud_round_ends = self._edge_round(server_round)
        if not cloud_round_ends:
            return []
        return self._messages(server_round, config, grid, self.fraction_evaluate, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "%s: evaluation on node %d failed: %s", self.name, reply.metadata.src_node_id, reply.error.reason)
            elif METRICS in reply.content and isinstance(reply.content[METRICS].get(NUM_EXAMPLES), (int, float)):
                usable.append(reply.content)
        return aggregate_metricrecords(usable, NUM_EXAMPLES) if usable else None


def lora_factors_of(record: ArrayRecord) -> dict[str, LoraFactors]:
    """The factors in an ArrayRecord written by this strategy (a checkpoint or ``Result.arrays``)."""
    return arrays_to_update(record).layers
