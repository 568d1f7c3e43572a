"""A minimal real LoRA client for the aggregation benchmark and the strategy tests.

Not the platform's ClientApp (that is ``clients/``, issue 4): a small, self-contained peft training
loop on a tiny Llama so that strategies can be exercised end to end by Flower's simulation engine
with real local training. It speaks both wire formats:

* aiflow-fl's (``aiflow_fl/protocol.py``): fold ``base`` into the frozen weights, start LoRA from
  ``lora`` (or fresh), train, reply ``lora`` + ``metrics`` + ``profile``;
* Flower's stock FedAvg: ``arrays`` holds the peft LoRA state dict, replied the same way.

Task (non-IID by construction): a Markov chain over 64 tokens. The frozen model is pre-trained on
chains where every token has 4 equally likely successors (``PRETRAIN``); the target task keeps only
the first 2 of them. Device data of domain d follow the target rule only after tokens ≡ d (mod 4)
and the pre-training rule elsewhere, so each domain teaches a quarter of the target and only the
federation as a whole can learn it all. Held-out accuracy is next-token accuracy on target chains
(pre-trained model ≈ 0.25, the best possible 0.5).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from aiflow_fl.aggregation.update import from_peft_state_dict, to_peft_state_dict
from aiflow_fl.files import atomic_torch_save
from aiflow_fl.models import tiny_model
from aiflow_fl.protocol import BASE, CONFIG, LORA, METRICS, NUM_EXAMPLES, PROFILE, arrays_to_update, update_to_arrays

VOCAB = 64
SEQ_LEN = 16
LAYERS = 2
HIDDEN = 32
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@dataclass
class DeviceSpec:
    """One simulated device: its LoRA rank and alpha, its edge, its data domains and its depth."""

    rank: int
    alpha: float
    edge_id: str
    domains: tuple[int, ...]
    layers: tuple[int, ...] | None = None  # LoRA on these layers only (a shallow member); None: all
    examples: int = 32


def default_devices(num_devices: int = 4, ranks: tuple[int, ...] = (2, 4, 8), num_edges: int = 2) -> list[DeviceSpec]:
    """Heterogeneous ranks, one domain per device (non-IID), devices round-robin over edges."""
    return [
        DeviceSpec(
            rank=ranks[i % len(ranks)],
            alpha=2.0 * ranks[i % len(ranks)],
            edge_id=f"edge-{i % num_edges}",
            domains=(i % 4,),
            examples=32 + 16 * (i % 3),
        )
        for i in range(num_devices)
    ]


_BASE_CACHE = Path(tempfile.gettempdir()) / "aiflow-bench-lora-client-base-v1.pt"


def successor_table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000)
    return torch.stack([torch.randperm(VOCAB, generator=gen)[:4] for _ in range(VOCAB)])


def chains(num_sequences: int, seed: int, domain: int | None = None, pretrain: bool = False) -> torch.Tensor:
    """Token chains: pre-training rule (4 successors), target rule (2), or a domain's mixture."""
    table = successor_table()
    gen = torch.Generator().manual_seed(seed)
    seq = torch.empty(num_sequences, SEQ_LEN, dtype=torch.long)
    seq[:, 0] = torch.randint(0, VOCAB, (num_sequences,), generator=gen)
    for t in range(1, SEQ_LEN):
        cur = seq[:, t - 1]
        four = torch.randint(0, 4, (num_sequences,), generator=gen)
        two = torch.randint(0, 2, (num_sequences,), generator=gen)
        if pretrain:
            pick = four
        elif domain is None:
            pick = two
        else:
            pick = torch.where(cur % 4 == domain, two, four)
        seq[:, t] = table[cur, pick]
    return seq


def base_model() -> torch.nn.Module:
    """The frozen pre-trained model every device starts from: a tiny Llama fully trained for 200
    steps on pre-training chains, cached in the temp folder (deterministic, written atomically)."""
    model = tiny_model("llama", num_layers=LAYERS, hidden_size=HIDDEN, vocab_size=VOCAB, seed=0)
    if _BASE_CACHE.is_file():
        model.load_state_dict(torch.load(_BASE_CACHE, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    data = chains(256, seed=1, pretrain=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(200):
        batch = data[torch.randint(0, data.shape[0], (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    atomic_torch_save(model.state_dict(), _BASE_CACHE)
    return model.eval()


def device_data(spec: DeviceSpec, seed: int) -> torch.Tensor:
    per = max(1, spec.examples // len(spec.domains))
    return torch.cat([chains(per, seed * 100 + d, domain=d) for d in spec.domains])


def heldout_data(num_sequences: int = 128) -> torch.Tensor:
    return chains(num_sequences, seed=999_000)


def fold_base(model: torch.nn.Module, base: dict) -> torch.nn.Module:
    """W0 + s·B@A for each module of the base (keys are the backbone's module paths), folded by the
    family Member's one fold (the tiny Llama is a ``full`` member of itself); returns the model."""
    from aiflow_fl.aggregation.update import AdapterUpdate
    from aiflow_fl.family.member import early_exit_member

    member = early_exit_member(model, "full")
    member.fold(AdapterUpdate(dict(base), 0))
    return member.model


def lora_model(spec: DeviceSpec, base: dict, lora: dict, freeze_a: bool, seed: int) -> torch.nn.Module:
    model = base_model()
    fold_base(model, base)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=TARGETS, lora_dropout=0.0,
        layers_to_transform=list(spec.layers) if spec.layers is not None else None,
    )
    model = get_peft_model(model, config)
    if lora:
        from aiflow_fl.aggregation.update import AdapterUpdate

        state = to_peft_state_dict(AdapterUpdate(lora, 0), spec.alpha)
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected LoRA keys {result.unexpected_keys[:3]}")
    if freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def train_lora(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """Plain AdamW next-token training of the LoRA parameters; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (min(16, data.shape[0]),), generator=gen)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def next_token_accuracy(model: torch.nn.Module, data: torch.Tensor) -> float:
    logits = model(input_ids=data).logits[:, :-1]
    return float((logits.argmax(-1) == data[:, 1:]).float().mean())


@torch.no_grad()
def heldout_accuracy(merged: dict, data: torch.Tensor | None = None) -> float:
    """Next-token accuracy of the pre-trained model with a merged update folded into its weights."""
    model = base_model()
    fold_base(model, merged)
    return next_token_accuracy(model, heldout_data() if data is None else data)


def make_client_app(
    devices: list[DeviceSpec] | dict[str, list[DeviceSpec]], steps: int = 8, lr: float = 1e-2, fail_node: int | None = None
) -> ClientApp:
    """A ClientApp whose partition i is ``devices[i]`` (or ``devices[config["device-set"]][i]``);
    ``fail_node`` sends NaN factors from round 2 on (fault tests)."""
    device_sets = devices if isinstance(devices, dict) else {"default": devices}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        config = msg.content[CONFIG]
        chosen = device_sets.get(str(config.get("device-set", "")), next(iter(device_sets.values())))
        spec = chosen[pid % len(chosen)]
        rnd = int(config.get("server-round", 1))
        local_steps = int(config.get("local-steps", steps))
        start = time.perf_counter()
        data = device_data(spec, seed=pid * 7919 + rnd)
        if "arrays" in msg.content:  # Flower's stock FedAvg: the LoRA state dict travels as is
            model = lora_model(spec, {}, {}, False, seed=pid)
            if len(msg.content["arrays"]) > 0:
                set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
            loss = train_lora(model, data, local_steps, lr, seed=pid + 31 * rnd)
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({NUM_EXAMPLES: data.shape[0], "train-loss": loss})})
            return Message(content=content, reply_to=msg)
        base, lora, held = start_of_round(msg, context, spec)
        if spec.layers is not None and rnd > 1:  # a shallow member must only get its own layers' keys
            foreign = [k for k in set(base) | set(lora) if int(k.split(".")[2]) not in spec.layers]
            if foreign:
                raise ValueError(f"device {pid} (layers {spec.layers}) received keys of other layers: {foreign[:2]}")
        model = lora_model(spec, base, lora, bool(config.get("freeze-lora-a", False)), seed=pid + 17 * rnd)
        # What this device starts from, as a probe the tests compare with the server's model.
        probe = start_probe(base, lora, spec.alpha / spec.rank)
        loss = train_lora(model, data, local_steps, lr, seed=pid + 31 * rnd)
        update = from_peft_state_dict(get_peft_model_state_dict(model), spec.alpha, num_examples=data.shape[0])
        record = update_to_arrays(update)
        if fail_node is not None and pid == fail_node and rnd > 1:
            key = next(iter(record.keys()))
            bad = record[key].numpy().copy()
            bad.flat[0] = float("nan")
            from flwr.app import Array

            record[key] = Array(bad)
        metrics = MetricRecord(
            {NUM_EXAMPLES: data.shape[0], "train-loss": loss, "train-time-s": time.perf_counter() - start, "start-probe": probe, "received-keys": len(set(base) | set(lora))}
        )
        profile = ConfigRecord({"member": f"rank{spec.rank}", "edge-id": spec.edge_id, "lora-rank": spec.rank, "lora-alpha": spec.alpha,
                                "base-version": held})
        return Message(content=RecordDict({LORA: record, METRICS: metrics, PROFILE: profile}), reply_to=msg)

    return app


def start_of_round(msg: Message, context: Context, spec: DeviceSpec) -> tuple[dict, dict, int]:
    """(what to fold, the LoRA start, the base version now held) by the wire protocol's device side
    (``aiflow_fl.protocol.device_start``); the cumulative base the device holds stays in ``context.state``."""
    from aiflow_fl.aggregation.update import AdapterUpdate
    from aiflow_fl.protocol import EDGE_BASE, device_start

    held = arrays_to_update(context.state["lc.base"]).layers if "lc.base" in context.state else {}
    held_version = int(context.state["lc.local"]["base-version"]) if "lc.local" in context.state else -1
    config = msg.content[CONFIG]
    layers = lambda name: arrays_to_update(msg.content[name]).layers if name in msg.content.array_records else {}  # noqa: E731
    start = device_start(
        held_base=held, held_version=held_version, base=layers(BASE), base_mode=str(config.get("base-mode", "replace")),
        base_from=int(config.get("base-from", -1)), base_version=int(config.get("base-version", 0)),
        edge_base=layers(EDGE_BASE), adapter=layers(LORA), truncation=str(config.get("truncation", "svd")),
        fold_remainder=bool(config.get("fold-remainder", False)), reinit_lora=bool(config.get("reinit-lora", False)),
        rank=spec.rank, alpha=spec.alpha,
    )
    context.state["lc.base"] = update_to_arrays(AdapterUpdate(start.held_base, 0))
    context.state["lc.local"] = ConfigRecord({"base-version": start.base_version})
    return start.fold, start.lora, start.base_version


def probe_matrix(key: str, shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, key)))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def probe(layers: dict) -> float:
    """⟨ΔW, R_key⟩ summed over keys, with fixed random probes: a fingerprint of a dense update."""
    total = 0.0
    for key, f in layers.items():
        delta = f.scaling * (f.B.double() @ f.A.double())
        total += float((delta * probe_matrix(key, tuple(delta.shape))).sum())
    return total


def start_probe(base: dict, lora: dict, scaling: float) -> float:
    from aiflow_fl.aggregation.update import LoraFactors

    return probe(base) + probe({k: LoraFactors(f.A, f.B, f.scaling) for k, f in lora.items()})
