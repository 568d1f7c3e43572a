"""The aiflow-fl ClientApp: a device fine-tunes its family member with LoRA on its private data.

The member is the family's one :class:`aiflow_fl.family.member.Member` (``member_from_config``: from
the family in ``family.dir``, else an early exit of ``model.name``); the server's base is folded into it
with ``Member.fold`` before LoRA is attached.

Thin Flower layer over :mod:`aiflow_fl.federated.device`: read the device profile from the node
config, unpack ``base``/``lora``/``config`` (see :mod:`aiflow_fl.protocol`), train or evaluate, reply
with ``lora``/``metrics``/``profile``. State that must outlive a message (data cursor, optimizer
moments, plug-in state) lives in ``context.state``.

Fault injection (node config ``fault=raise|hang|nan|shape|missing``, optionally ``fault-rounds="1,3"``)
makes a device misbehave on purpose, so tests can drive the server's fault handling through real
Flower processes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.config import AiflowConfig, from_run_config
from aiflow_fl.federated.device import DeviceProfile, DeviceState, device_evaluate, device_profile, device_train
from aiflow_fl.federated.local import TrainingHooks
from aiflow_fl.protocol import BASE, CONFIG, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, update_to_arrays

STATE_LOCAL, STATE_OPTIMIZER, STATE_EXTRA = "aiflow.local", "aiflow.optimizer", "aiflow.extra"


def load_state(context: Context) -> DeviceState:
    state = DeviceState()
    if STATE_LOCAL in context.state:
        local = context.state[STATE_LOCAL]
        state.cursor, state.rounds_trained = int(local["cursor"]), int(local["rounds-trained"])
    if STATE_OPTIMIZER in context.state:
        record = context.state[STATE_OPTIMIZER]
        state.optimizer = {key: record[key].numpy() for key in record.keys()}
    if STATE_EXTRA in context.state:
        state.extra = json.loads(str(context.state[STATE_EXTRA]["json"]))
    return state


def save_state(context: Context, state: DeviceState) -> None:
    context.state[STATE_LOCAL] = ConfigRecord({"cursor": state.cursor, "rounds-trained": state.rounds_trained})
    context.state[STATE_OPTIMIZER] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.optimizer.items()})
    context.state[STATE_EXTRA] = ConfigRecord({"json": json.dumps(state.extra)})


def training_hooks(cfg: AiflowConfig, state: DeviceState, profile: DeviceProfile | None = None) -> TrainingHooks:
    """Hooks for local training. Privacy (DP-SGD) and continual learning plug in here."""
    hooks = TrainingHooks()
    if cfg.continual.enabled and profile is not None:
        from aiflow_fl.continual import add_continual_hooks

        add_continual_hooks(hooks, cfg, state, profile)
    if cfg.privacy.enabled:
        from aiflow_fl.privacy import add_dp_hooks

        add_dp_hooks(hooks, cfg, state, profile.partition_id if profile is not None else None)
    return hooks


def _received(msg: Message) -> tuple[AdapterUpdate | None, AdapterUpdate | None, dict[str, Any]]:
    content = msg.content
    base = arrays_to_update(content.array_records[BASE]) if BASE in content.array_records else None
    lora = arrays_to_update(content.array_records[LORA]) if LORA in content.array_records else None
    config = dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {}
    return base, lora, config


def _profile_record(profile: DeviceProfile) -> ConfigRecord:
    return ConfigRecord({"member": profile.member, "edge-id": profile.edge_id, "lora-rank": profile.lora_rank,
                         "lora-alpha": profile.lora_alpha, "partition-id": profile.partition_id})


def _inject_fault(profile: DeviceProfile, server_round: int, record: ArrayRecord) -> ArrayRecord:
    if not profile.fault or (profile.fault_rounds and server_round not in profile.fault_rounds):
        return record
    if profile.fault == "raise":
        raise RuntimeError(f"injected fault: device {profile.partition_id} fails in round {server_round}")
    if profile.fault == "hang":
        time.sleep(profile.fault_seconds)
    keys = list(record.keys())
    first = next(k for k in keys if k.endswith("::A"))
    if profile.fault == "nan":
        bad = record[first].numpy().copy()
        bad.flat[0] = np.nan
        record[first] = Array(bad)
    elif profile.fault == "shape":
        record[first] = Array(np.zeros((1, 3), dtype=np.float32))
    elif profile.fault == "missing":
        del record[first]
    return record


def build_client_app(cfg: AiflowConfig | None = None, node_overrides: dict[int, dict[str, Any]] | None = None) -> ClientApp:
    """A ClientApp; ``cfg`` fixes the config (in-process simulation), else it comes from the run config.

    ``node_overrides[partition_id]`` adds node-config entries to simulated devices (a simulation's
    node config holds only partition-id and num-partitions): e.g. a member, a rank or a fault.
    """
    app = ClientApp()
    overrides = node_overrides or {}

    def config_of(context: Context) -> AiflowConfig:
        return cfg if cfg is not None else from_run_config(dict(context.run_config))

    def profile_of(context: Context, run_cfg: AiflowConfig) -> DeviceProfile:
        node = dict(context.node_config)
        node.update(overrides.get(int(node.get("partition-id", -1)), {}))
        return device_profile(node, run_cfg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = config_of(context)
        profile = profile_of(context, run_cfg)
        base, lora, config = _received(msg)
        server_round = int(config.get("server-round", 0))
        state = load_state(context)
        update, metrics = device_train(
            run_cfg, profile, state, base, lora, server_round,
            local_steps=int(config.get("local-steps", run_cfg.train.local_steps)),
            lr=float(config.get("lr", run_cfg.train.lr)),
            hooks=training_hooks(run_cfg, state, profile),
            freeze_lora_a=bool(config.get("freeze-lora-a", False)),
        )
        save_state(context, state)
        arrays = _inject_fault(profile, server_round, update_to_arrays(update))
        metric_record = MetricRecord({NUM_EXAMPLES: update.num_examples, **{k: float(v) for k, v in metrics.items()}})
        reply = RecordDict({LORA: arrays, METRICS: metric_record, PROFILE: _profile_record(profile)})
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg = config_of(context)
        profile = profile_of(context, run_cfg)
        base, lora, _ = _received(msg)
        n, metrics = device_evaluate(run_cfg, profile, base, lora)
        record = MetricRecord({NUM_EXAMPLES: n, **metrics})
        return Message(RecordDict({METRICS: record, PROFILE: _profile_record(profile)}), reply_to=msg)

    return app


app = build_client_app()
