"""What one device does in a round, without Flower: profile, data, member + LoRA, train, evaluate.

The member is the family's :class:`~aiflow_fl.family.member.Member` (:func:`member_from_config
<aiflow_fl.family.member.member_from_config>`, a cheap copy of a per-process pristine member); the
server's ``base`` is folded in with ``Member.fold``, updates travel under ``Member.key_of`` keys.

The ClientApp (``clients/app.py``) only converts Flower records to these arguments and back.
:class:`DeviceState` is everything that must survive between rounds; the ClientApp keeps it in
``context.state`` (each Flower message may run in a fresh process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.config import AiflowConfig
from aiflow_fl.data import DeviceData, device_data, load_chunks
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.local import (
    TrainingHooks,
    batch_tensors,
    evaluate,
    optimizer_state_arrays,
    restore_optimizer_state,
    round_batches,
    train_local,
)
from aiflow_fl.family.member import member_from_config
from aiflow_fl.federated.lora import attach_lora, extract_update, load_update, lora_module_paths


FAULTS = ("", "raise", "hang", "nan", "shape", "missing")


@dataclass
class DeviceProfile:
    """Who a device is: from its node config, else derived from its partition id and the config."""

    partition_id: int
    num_partitions: int
    member: str
    lora_rank: int
    lora_alpha: float
    edge_id: int
    memory_budget_mb: float = 0.0
    fault: str = ""  # fault injection for fault-tolerance tests: raise | hang | nan | shape | missing
    fault_rounds: tuple[int, ...] = ()  # rounds the fault happens in; empty: every round
    fault_seconds: float = 3600.0  # how long fault=hang sleeps


def device_profile(node_config: dict[str, Any], cfg: AiflowConfig) -> DeviceProfile:
    """Node config keys ``partition-id``, ``num-partitions``, ``member``, ``lora-rank``, ``lora-alpha``,
    ``edge-id``, ``memory-budget-mb``; missing ones follow ``federation.members``/``ranks`` cycled by
    partition id, edges as contiguous groups of devices."""
    fed = cfg.federation
    try:
        pid = int(node_config.get("partition-id", 0))
        n = int(node_config.get("num-partitions", fed.num_devices))
        rank = int(node_config.get("lora-rank", fed.ranks[pid % len(fed.ranks)] if fed.ranks else cfg.lora.rank))
        alpha = float(node_config.get("lora-alpha", cfg.lora.alpha))
        edge = int(node_config.get("edge-id", pid * max(1, fed.num_edges) // max(1, n)))
        budget = float(node_config.get("memory-budget-mb", fed.memory_budget_mb))
        fault_rounds = tuple(int(r) for r in str(node_config.get("fault-rounds", "")).replace(",", " ").split())
        fault_seconds = float(node_config.get("fault-seconds", 3600.0))
    except (TypeError, ValueError) as exc:
        raise AiflowError(f"Bad node config {dict(node_config)}: {exc}. partition-id, num-partitions, lora-rank, edge-id are integers.") from None
    member = str(node_config.get("member", fed.members[pid % len(fed.members)] if fed.members else "full"))
    if not 0 <= pid < n:
        raise AiflowError(f"Node config partition-id={pid} must be in [0, {n - 1}] (num-partitions={n}).")
    if rank < 1:
        raise AiflowError(f"Node config lora-rank={rank} must be >= 1.")
    fault = str(node_config.get("fault", ""))
    if fault not in FAULTS:
        raise AiflowError(f"Node config fault='{fault}' is not one of: {', '.join(f for f in FAULTS if f)} (or empty).")
    return DeviceProfile(pid, n, member, rank, alpha, edge, budget, fault, fault_rounds, fault_seconds)


@dataclass
class DeviceState:
    """Kept across rounds: where the device is in its data stream and its optimizer moments."""

    cursor: int = 0
    rounds_trained: int = 0
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # for plug-ins (privacy accountant, replay buffer)
    base: dict[str, Any] = field(default_factory=dict)  # the cloud's cumulative base this device holds (LoraFactors)
    base_version: int = -1  # its version (protocol: the server sends changes from it)


_DATA: dict[tuple, DeviceData] = {}


def load_device_data(cfg: AiflowConfig, profile: DeviceProfile, tokenizer) -> DeviceData:
    """The device's partition and held-out chunks (deterministic from the config; cached per process)."""
    d = cfg.data
    key = (d.source, d.seq_len, d.partitioner, d.dirichlet_alpha, d.classes_per_partition, d.heldout_fraction,
           d.max_examples_per_client, d.max_heldout_examples, cfg.run.seed, profile.partition_id, profile.num_partitions,
           tokenizer.name_or_path)
    if key not in _DATA:
        chunks = load_chunks(d.source, tokenizer, d.seq_len)
        _DATA[key] = device_data(
            chunks, profile.partition_id, profile.num_partitions, partitioner=d.partitioner, alpha=d.dirichlet_alpha,
            classes_per_partition=d.classes_per_partition, heldout_fraction=d.heldout_fraction,
            max_train=d.max_examples_per_client, max_heldout=d.max_heldout_examples, seed=cfg.run.seed,
        )
    return _DATA[key]


def prepare_member(cfg: AiflowConfig, profile: DeviceProfile, base: AdapterUpdate | None, lora: AdapterUpdate | None):
    """Load the member, fold ``base`` into its frozen weights, attach LoRA and start it from ``lora``."""
    member = member_from_config(cfg, profile.member)
    if profile.memory_budget_mb > 0:
        weight_mb = sum(p.numel() * p.element_size() for p in member.model.parameters()) / 2**20
        if weight_mb > profile.memory_budget_mb:
            raise AiflowError(
                f"Member '{profile.member}' needs {weight_mb:.0f} MB for its weights alone, more than this device's "
                f"memory budget of {profile.memory_budget_mb:.0f} MB; give the device a smaller member or a larger budget."
            )
    if base is not None:
        member.fold(base)
    peft_model = attach_lora(member.model, profile.lora_rank, profile.lora_alpha, cfg.lora.dropout,
                             list(cfg.lora.target_modules), seed=cfg.run.seed)
    if lora is not None and lora.layers:
        # A node the server has not heard from gets the family's every key (messages do not depend on
        # the node); a shallow member starts the layers it has, like Member.fold does for the base.
        own = {member.key_of(p) for p in lora_module_paths(peft_model)}
        mine = {k: f for k, f in lora.layers.items() if k in own}
        if not mine:
            raise ValueError(f"server LoRA shares no module with member '{profile.member}': {sorted(lora.layers)[:3]}")
        load_update(peft_model, member, AdapterUpdate(mine, lora.num_examples), profile.lora_alpha)
    return member, peft_model


def device_train(
    cfg: AiflowConfig,
    profile: DeviceProfile,
    state: DeviceState,
    base: AdapterUpdate | None,
    lora: AdapterUpdate | None,
    server_round: int,
    local_steps: int,
    lr: float,
    hooks: TrainingHooks | None = None,
    freeze_lora_a: bool = False,
) -> tuple[AdapterUpdate, dict[str, float]]:
    """One round of local LoRA training; returns the update (family keys) and flat metrics.

    ``freeze_lora_a``: train only B (FFA-LoRA keeps the shared A fixed, so averaging B is exact).
    """
    hooks = hooks or TrainingHooks()
    torch.manual_seed(cfg.run.seed + 7919 * profile.partition_id + server_round)
    member, model = prepare_member(cfg, profile, base, lora)
    if freeze_lora_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    data = load_device_data(cfg, profile, member.tokenizer)
    chunks = hooks.round_data(data.train, server_round) if hooks.round_data else data.train
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = hooks.make_optimizer(params, lr)
    restored = restore_optimizer_state(optimizer, names, state.optimizer) if state.optimizer and cfg.train.keep_optimizer_state else 0
    index_batches, state.cursor = round_batches(len(chunks), cfg.train.batch_size, local_steps, state.cursor,
                                                cfg.run.seed + profile.partition_id)
    batches = list(batch_tensors(chunks, index_batches))
    train_model, train_opt = model, optimizer
    if hooks.prepare is not None:
        train_model, train_opt, batches = hooks.prepare(model, optimizer, batches)
    result = train_local(train_model, batches, train_opt)
    if hooks.after_round is not None:
        result.extra.update(hooks.after_round(result))
    state.optimizer = optimizer_state_arrays(optimizer, names)
    state.rounds_trained += 1
    update = extract_update(model, member, profile.lora_alpha, num_examples=len(chunks))
    metrics = result.metrics() | {"optimizer-restored": float(restored), "domains": float(len(set(chunks.domains)))}
    if profile.memory_budget_mb > 0:
        metrics["over-memory-budget"] = float(result.peak_rss_mb > profile.memory_budget_mb)
    return update, metrics


def device_evaluate(
    cfg: AiflowConfig, profile: DeviceProfile, base: AdapterUpdate | None, lora: AdapterUpdate | None
) -> tuple[int, dict[str, float]]:
    """Held-out loss and next-token accuracy of the member (with the given adapter) on its domains."""
    member, model = prepare_member(cfg, profile, base, lora)
    data = load_device_data(cfg, profile, member.tokenizer)
    return len(data.heldout), evaluate(model, data.heldout, cfg.train.eval_batch_size)
