"""The aiflow-fl ClientApp: a device fine-tunes its family member with LoRA on its private data.

The member is the family's one :class:`aiflow_fl.family.member.Member` (``member_from_config``: from
the family in ``family.dir``, else an early exit of ``model.name``); the server's base is folded into it
with ``Member.fold`` before LoRA is attached.

Thin Flower layer over :mod:`aiflow_fl.federated.device`: read the device profile from the node
config, unpack ``base``/``lora``/``config`` (see :mod:`aiflow_fl.protocol`), train or evaluate, reply
with ``lora``/``metrics``/``profile``. State that must outlive a message (data cursor, optimizer
moments, plug-in state such as the DP accountant, the cumulative base it holds) lives in
``context.state`` and, after every round it trains, in a state file
``<run.dir>/devices/device-<partition>/round-<R>.safetensors`` (node config ``state-dir`` to put it
elsewhere). A device whose ``context.state`` is empty (a resumed run, a restarted SuperNode) continues
from its newest state file of a round before the current one, so a resumed run's devices are where an
uninterrupted run's would be.

Fault injection (node config ``fault=raise|hang|nan|shape|missing``, optionally ``fault-rounds="1,3"``)
makes a device misbehave on purpose, so tests can drive the server's fault handling through real
Flower processes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aiflow_fl.aggregation.update import AdapterUpdate
from aiflow_fl.config import AiflowConfig, from_run_config
from aiflow_fl.federated.device import DeviceProfile, DeviceState, device_evaluate, device_profile, device_train
from aiflow_fl.federated.local import TrainingHooks
from aiflow_fl.files import atomic_write_bytes
from aiflow_fl.federated.attacks import is_attacker, poison
from aiflow_fl.protocol import (
    BASE, CONFIG, EDGE_BASE, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, device_start, update_to_arrays,
)

STATE_LOCAL, STATE_OPTIMIZER, STATE_EXTRA, STATE_BASE = "aiflow.local", "aiflow.optimizer", "aiflow.extra", "aiflow.base"
_STATE_FILE = re.compile(r"^round-(\d+)\.safetensors$")
STATE_FILES_KEPT = 2  # per device: enough to resume from a checkpoint one round behind the newest state


def load_state(context: Context) -> DeviceState:
    state = DeviceState()
    if STATE_LOCAL in context.state:
        local = context.state[STATE_LOCAL]
        state.cursor, state.rounds_trained = int(local["cursor"]), int(local["rounds-trained"])
        state.base_version = int(local.get("base-version", -1))
    if STATE_OPTIMIZER in context.state:
        record = context.state[STATE_OPTIMIZER]
        state.optimizer = {key: record[key].numpy() for key in record.keys()}
    if STATE_EXTRA in context.state:
        state.extra = json.loads(str(context.state[STATE_EXTRA]["json"]))
    if STATE_BASE in context.state:
        state.base = arrays_to_update(context.state[STATE_BASE]).layers
    return state


def save_state(context: Context, state: DeviceState) -> None:
    context.state[STATE_LOCAL] = ConfigRecord({"cursor": state.cursor, "rounds-trained": state.rounds_trained,
                                               "base-version": state.base_version})
    context.state[STATE_OPTIMIZER] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.optimizer.items()})
    context.state[STATE_EXTRA] = ConfigRecord({"json": json.dumps(state.extra)})
    context.state[STATE_BASE] = update_to_arrays(AdapterUpdate(state.base, 0))


def state_dir(cfg: AiflowConfig, node_config: dict[str, Any], partition_id: int) -> Path | None:
    """Where a device keeps its state files (None: nowhere, when the run has no folder)."""
    root = node_config.get("state-dir") or (str(Path(cfg.run.dir) / "devices") if cfg.run.dir else "")
    return Path(str(root)) / f"device-{partition_id:05d}" if root else None


def write_state_file(folder: Path, server_round: int, state: DeviceState) -> Path:
    """The device's state after ``server_round``, atomically; older files beyond the newest few are removed."""
    from safetensors.numpy import save

    tensors = {f"opt/{k}": np.ascontiguousarray(v) for k, v in state.optimizer.items()}
    for key, arr in update_to_arrays(AdapterUpdate(state.base, 0)).items():
        tensors[f"base/{key}"] = np.ascontiguousarray(arr.numpy())
    meta = {"cursor": state.cursor, "rounds-trained": state.rounds_trained, "base-version": state.base_version,
            "extra": state.extra, "round": server_round}
    path = folder / f"round-{server_round:04d}.safetensors"
    atomic_write_bytes(path, save(tensors, metadata={"state": json.dumps(meta)}))
    for _, old in sorted(_state_files(folder))[:-STATE_FILES_KEPT]:
        old.unlink(missing_ok=True)
    return path


def _state_files(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    return [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_FILE.match(p.name))]


def read_state_file(folder: Path, before_round: int) -> DeviceState | None:
    """The newest state written after a round < ``before_round`` (None when there is none)."""
    from flwr.app import Array as FlwrArray
    from safetensors import safe_open
    from safetensors.numpy import load_file

    found = sorted(r for r in _state_files(folder) if r[0] < before_round)
    if not found:
        return None
    path = found[-1][1]
    with safe_open(str(path), framework="numpy") as fh:
        meta = json.loads((fh.metadata() or {})["state"])
    tensors = load_file(str(path))
    state = DeviceState(cursor=int(meta["cursor"]), rounds_trained=int(meta["rounds-trained"]),
                        extra=dict(meta["extra"]), base_version=int(meta["base-version"]))
    state.optimizer = {k[len("opt/"):]: v for k, v in tensors.items() if k.startswith("opt/")}
    base = ArrayRecord({k[len("base/"):]: FlwrArray(v) for k, v in tensors.items() if k.startswith("base/")})
    state.base = arrays_to_update(base).layers
    return state


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


def _received(msg: Message) -> tuple[dict, dict, dict, dict[str, Any]]:
    """(base change, edge base, adapter, config) of a server message (missing records: empty)."""
    content = msg.content
    layers = lambda name: arrays_to_update(content.array_records[name]).layers if name in content.array_records else {}  # noqa: E731
    config = dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {}
    return layers(BASE), layers(EDGE_BASE), layers(LORA), config


def start_point(state: DeviceState, profile: DeviceProfile, msg: Message):
    """The device's start for this round (``protocol.device_start``); updates the base it holds."""
    base, edge_base, adapter, config = _received(msg)
    start = device_start(
        held_base=state.base, held_version=state.base_version, base=base,
        base_mode=str(config.get("base-mode", "replace")), base_from=int(config.get("base-from", -1)),
        base_version=int(config.get("base-version", 0)), edge_base=edge_base, adapter=adapter,
        truncation=str(config.get("truncation", "svd")), fold_remainder=bool(config.get("fold-remainder", False)),
        reinit_lora=bool(config.get("reinit-lora", False)), rank=profile.lora_rank, alpha=profile.lora_alpha,
    )
    state.base, state.base_version = start.held_base, start.base_version
    return AdapterUpdate(start.fold, 0), AdapterUpdate(start.lora, 0), config


def _profile_record(profile: DeviceProfile) -> ConfigRecord:
    return ConfigRecord({"member": profile.member, "edge-id": profile.edge_id, "lora-rank": profile.lora_rank,
                         "lora-alpha": profile.lora_alpha, "partition-id": profile.partition_id})


def _with_base_version(record: ConfigRecord, state: DeviceState) -> ConfigRecord:
    record["base-version"] = state.base_version
    return record


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
        server_round = int(msg.content.config_records[CONFIG].get("server-round", 0)) if CONFIG in msg.content.config_records else 0
        folder = state_dir(run_cfg, dict(context.node_config), profile.partition_id)
        if STATE_LOCAL not in context.state and folder is not None:
            state = read_state_file(folder, server_round) or DeviceState()  # a fresh process of a resumed run
        else:
            state = load_state(context)
        base, lora, config = start_point(state, profile, msg)
        update, metrics = device_train(
            run_cfg, profile, state, base, lora, server_round,
            local_steps=int(config.get("local-steps", run_cfg.train.local_steps)),
            lr=float(config.get("lr", run_cfg.train.lr)),
            hooks=training_hooks(run_cfg, state, profile),
            freeze_lora_a=bool(config.get("freeze-lora-a", False)),
        )
        save_state(context, state)
        if folder is not None:
            write_state_file(folder, server_round, state)
        fed = run_cfg.federation
        if is_attacker(run_cfg.run.seed, profile.partition_id, fed.attack_fraction):  # robustness studies only
            update = poison(update, fed.attack, fed.attack_scale, start=lora.layers)  # its change, not the server's adapter
            metrics["attacker"] = 1.0
        arrays = _inject_fault(profile, server_round, update_to_arrays(update))
        metric_record = MetricRecord({NUM_EXAMPLES: update.num_examples, **{k: float(v) for k, v in metrics.items()}})
        reply = RecordDict({LORA: arrays, METRICS: metric_record, PROFILE: _with_base_version(_profile_record(profile), state)})
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_cfg = config_of(context)
        profile = profile_of(context, run_cfg)
        base, lora, _ = start_point(DeviceState(), profile, msg)  # evaluation messages carry the whole base
        n, metrics = device_evaluate(run_cfg, profile, base, lora)
        record = MetricRecord({NUM_EXAMPLES: n, **metrics})
        return Message(RecordDict({METRICS: record, PROFILE: _profile_record(profile)}), reply_to=msg)

    return app


app = build_client_app()
