"""The Message-API strategy shared by every aiflow-fl method: per-node messages, faults, edges, bytes.

:class:`LoraStrategy` is a ``flwr.serverapp.strategy.Strategy`` whose aggregation rule is a pure
function ``method(updates) -> Aggregate`` from :mod:`aiflow_fl.aggregation`; the modules next to this
one bind each method to a named class. Everything Flower-specific lives here and stays thin:

* **Messages** (wire contract: ``aiflow_fl/protocol.py``). Every device of a tier gets the tier's
  global adapter at the global rank (``global_rank``; a device cuts it to its own rank itself, by the
  rule named in the config), the cloud's cumulative base *as a change* since the version the device
  holds (the whole base only for a device the server has no version for) and, with edges, its edge's
  base. Once a node has replied, it receives only the keys its member trains. Nothing in a message
  depends on a node's rank, so the server keeps no per-device state to build one and a resumed server
  sends exactly what an uninterrupted one would.
* **Rank that does not grow.** After every cloud aggregation a product-space method's adapter is cut
  back to ``global_rank`` (truncated SVD, Eckart–Young). ``downlink="exact"``: what is cut goes into
  the cumulative base (the server's model is unchanged, every device starts from exactly it);
  ``downlink="lean"``: it is dropped and no remainder is folded, so a device receives only the
  adapter (the FlexLoRA paper's rule: downlink ≤ uplink), at the price of devices starting from the
  server's model truncated to their rank.
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
from dataclasses import dataclass, field, replace
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
from aiflow_fl.protocol import BASE, CONFIG, EDGE_BASE, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, update_to_arrays
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
    global_rank : rank the cloud's adapter is cut back to after each aggregation (0: no cut).
    downlink : "exact" (the cut goes into the base; remainders folded) or "lean" (dropped; see above).
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
        global_rank: int = 0,
        downlink: str = "exact",
    ) -> None:
        if downlink not in ("exact", "lean"):
            raise AiflowError(f"federation.downlink is '{downlink}', which is not one of: exact, lean.")
        if global_rank < 0:
            raise AiflowError(f"federation.global_rank is {global_rank}; it must be ≥ 0 (0: no cut).")
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
        self.global_rank = global_rank
        self.downlink = downlink
        self.round_offset = 0  # Flower rounds done before this server started (resume): rounds are global
        # Server state: the cloud's cumulative base (relative to the frozen weights) and last aggregate.
        self.base: Layers = {}
        self.cloud: Aggregate | None = None
        self.edges: dict[str, EdgeAggregator] = {}
        self.profiles: dict[int, NodeProfile] = {}
        self.shapes: dict[str, tuple[int, int]] = {}  # key -> (out, in), learned from good replies
        self.history: list[dict[str, Any]] = []  # per Flower round: comm figures and fault counts
        self.reply_metrics: dict[int, dict[int, dict[str, float]]] = {}  # Flower round -> node -> its good reply's metrics
        self.base_version = 0  # bumped whenever the cumulative base changes
        self.base_increments: list[tuple[int, Layers]] = []  # (version, change to reach it): what devices download
        self.node_versions: dict[int, int] = {}  # base version each node said it holds (nodes that replied)
        self._edges_version: int | None = None  # base version the edges hold
        self._sent: dict[int, Aggregate | None] = {}  # the adapter view each node was sent this round
        self._round: dict[str, Any] = {}
        self._cache: dict[tuple, ArrayRecord] = {}  # records shared by nodes of one tier / key set / version

    # ----------------------------------------------------------------- Flower entry point
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run ``num_rounds`` cloud rounds (each = ``hierarchy.edge_rounds`` Flower rounds).

        ``initial_arrays``: a previous run's merged update (it becomes the base), or an empty
        ArrayRecord; a resume that restored :meth:`load_state` first passes an empty one.
        """
        if initial_arrays is not None and len(initial_arrays) > 0 and not self.base and self.cloud is None:
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
    def _tier(self, node_id: int) -> tuple[str, Aggregate | None, Layers]:
        """(tier name, the aggregate its devices start from, the tier's base relative to the cloud's)."""
        if self.hierarchy is not None:
            edge = self._edge(self._edge_of(node_id))
            if edge.active:
                return edge.edge_id, edge.last, edge.base()
        return "cloud", self.cloud, {}

    def _view(self, agg: Aggregate | None) -> Aggregate | None:
        """The adapter rule as devices apply it (lean: no remainder folded)."""
        if agg is None or self.downlink == "exact" or not agg.fold_remainder:
            return agg
        return replace(agg, fold_remainder=False)

    def _base_change(self, version: int | None) -> tuple[str, int, Layers]:
        """(mode, from-version, layers): the cumulative base as a change from ``version`` (None: unknown)."""
        if version is None or version > self.base_version:
            return "replace", -1, self.base
        if version == self.base_version:
            return "add", version, {}
        change = lowrank.add([layers for v, layers in self.base_increments if v > version])
        size = lambda layers: sum(f.A.numel() + f.B.numel() for f in layers.values())  # noqa: E731
        if not self.base_increments or self.base_increments[0][0] > version + 1 or size(change) > size(self.base):
            return "replace", -1, self.base  # history pruned, or the change is no smaller than the whole
        return "add", version, change

    def _record(self, what: tuple, layers: Layers, keys: set[str] | None) -> ArrayRecord:
        """An ArrayRecord of ``layers`` restricted to ``keys``, built once per round and shared."""
        cache_key = (*what, frozenset(keys) if keys is not None else None)
        if cache_key not in self._cache:
            picked = {k: f for k, f in layers.items() if keys is None or k in keys}
            self._cache[cache_key] = update_to_arrays(AdapterUpdate(picked, 0))
        return self._cache[cache_key]

    def node_content(self, node_id: int, config: ConfigRecord, kind: str = MessageType.TRAIN) -> tuple[RecordDict, Aggregate | None]:
        """The message content for one node, and the adapter view its reply will be relative to."""
        profile = self.profiles.get(node_id)
        keys = profile.keys if profile is not None else None
        tier, agg, edge_base = self._tier(node_id)
        view = self._view(agg)
        known = self.node_versions.get(node_id) if kind == MessageType.TRAIN else None  # evaluation: the whole base
        mode, base_from, change = self._base_change(known)
        node_config = ConfigRecord(dict(config))
        node_config.update({
            "base-mode": mode, "base-from": base_from, "base-version": self.base_version,
            "truncation": view.truncation if view is not None else "svd",
            "fold-remainder": bool(view.fold_remainder) if view is not None else False,
            "reinit-lora": bool(view.reinit_lora) if view is not None else False,
        })
        records = {
            BASE: self._record(("base", mode, base_from, self.base_version), change, keys),
            EDGE_BASE: self._record(("edge-base", tier), edge_base, keys),
            LORA: self._record(("lora", tier), view.adapter if view is not None else {}, keys),
        }
        # an empty record is left out (devices read a missing one as empty): lean messages carry no
        # record names for nothing
        content = RecordDict({name: record for name, record in records.items() if len(record) > 0})
        content[CONFIG] = node_config
        return content, view

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float, kind: str) -> list[Message]:
        num_nodes = len(list(grid.get_node_ids()))
        sample_size = max(int(num_nodes * fraction), self.min_clients)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        edge_round, _ = self._edge_round(server_round)
        base_config = ConfigRecord(dict(config))
        base_config.update({
            "server-round": self.round_offset + server_round,  # global: a resumed run continues the numbering
            "edge-round": edge_round,
            "method": self.name,
            "freeze-lora-a": self.freeze_lora_a,
        })
        messages = []
        for node_id in node_ids:
            content, view = self.node_content(node_id, base_config, kind)
            if kind == MessageType.TRAIN:
                self._sent[node_id] = view
                self._count(self._down_link(), node_id, comm.serialized_bytes(content))
            messages.append(Message(content=content, message_type=kind, dst_node_id=node_id))
        return messages

    def _active_reinit(self) -> bool:
        return self.cloud is not None and self.cloud.reinit_lora

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        edge_round, _ = self._edge_round(server_round)
        t0 = time.perf_counter()
        self._round = {"bytes": {link: 0 for link in comm.LINKS}, "down": {}, "up": {}, "t0": t0}
        self._sent = {}
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
            # an edge holds the cloud's base like a device does: it gets the change since the last cloud round
            _, _, change = self._base_change(self._edges_version)
            content = RecordDict({BASE: update_to_arrays(AdapterUpdate(pick(change), 0)), LORA: update_to_arrays(AdapterUpdate(adapter, 0))})
            size = comm.serialized_bytes(content)
            self._round["bytes"][comm.CLOUD_TO_EDGE] += size
            self._round["cloud_to_edge"][edge_id] = size
        self._edges_version = self.base_version

    # ----------------------------------------------------------------- uplink
    def parse_reply(self, reply: Message) -> AdapterUpdate | None:
        """A good reply's update relative to its tier's reference, or None (logged) if it is bad."""
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "%s: node %d replied with an error and is left out: %s", self.name, node_id, reply.error.reason)
            self.node_versions.pop(node_id, None)  # it may have lost its state: send it the whole base next time
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
            self.node_versions.pop(node_id, None)  # which base it holds is unknown now: the whole base next time
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
        if PROFILE in content and "base-version" in content[PROFILE]:
            self.node_versions[node_id] = int(content[PROFILE]["base-version"])
        update.member = profile.member
        update.metrics = {k: float(v) for k, v in content[METRICS].items() if isinstance(v, (int, float))}
        # The node's adapter relative to its tier's base: its factors plus what it folded into its base
        # from the adapter (the same pure rule the device applied, protocol.device_start).
        view = self._sent.get(node_id)
        extra = view.for_rank(profile.rank, profile.scaling, keys=set(update.layers))[0] if view is not None else {}
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
        """Take a cloud aggregate: cut its adapter back to ``global_rank`` and grow the cumulative base."""
        cut: Layers = {}
        if self.global_rank and agg.truncation == "svd":  # product-space methods (prefix ones keep their rank)
            for key, f in list(agg.adapter.items()):
                if f.rank > self.global_rank:
                    kept = lowrank.refactor([lowrank.scaled(f)], max_rank=self.global_rank)
                    if self.downlink == "exact":
                        cut[key] = lowrank.difference(f, kept)
                    agg.adapter[key] = kept
        increment = lowrank.add([agg.base, cut]) if (agg.base or cut) else {}
        if increment:
            self.base = lowrank.add([self.base, increment])
            self.base_version += 1
            # a device more than a few versions behind gets the whole base instead (bounded server memory)
            self.base_increments = [*self.base_increments, (self.base_version, increment)][-8:]
        self.cloud = agg

    # ----------------------------------------------------------------- checkpoint state
    def state_tensors(self) -> dict[str, Any]:
        """The cloud state a checkpoint keeps: the cumulative base and the adapter, apart (so the
        adapter keeps its rank and a resumed server sends what an uninterrupted one would)."""
        out: dict[str, Any] = {}
        for prefix, layers in (("base/", self.base), ("adapter/", self.cloud.adapter if self.cloud else {})):
            for key, arr in update_to_arrays(AdapterUpdate(layers, 0)).items():
                out[prefix + key] = arr.numpy()
        return out

    def state_meta(self) -> dict[str, Any]:
        agg = self.cloud
        return {
            "base-version": self.base_version,
            "cloud": None if agg is None else {
                "truncation": agg.truncation, "fold_remainder": agg.fold_remainder, "reinit_lora": agg.reinit_lora,
                "keep_factors_upward": agg.keep_factors_upward, "num_examples": agg.num_examples,
                "key_examples": dict(agg.key_examples),
            },
        }

    def load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` / :meth:`state_meta` saved (a checkpoint of a
        previous version holds only the merged update: it becomes the base)."""
        from flwr.app import Array

        def layers(prefix: str) -> Layers:
            record = ArrayRecord({k[len(prefix):]: Array(v) for k, v in tensors.items() if k.startswith(prefix)})
            return arrays_to_update(record).layers

        try:
            if not any(k.startswith(("base/", "adapter/")) for k in tensors):
                self.base, self.cloud = layers(""), None
                self.base_version = 1 if self.base else 0
                return
            self.base = layers("base/")
            self.base_version = int(meta.get("base-version", 0))
            cloud = meta.get("cloud")
            self.cloud = None if cloud is None else Aggregate(adapter=layers("adapter/"), **cloud)
        except (ValueError, TypeError) as exc:
            raise AiflowError(
                f"The checkpoint to resume from is not an aiflow-fl strategy state (keys 'base/…', 'adapter/…' "
                f"as '<module>::A|B|scaling'): {exc}. Resume from a checkpoint this strategy wrote."
            ) from None
        self.base_increments = []  # devices get the whole base once after a resume

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
