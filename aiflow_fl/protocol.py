"""What crosses the wire in a federated round: record names, (un)packing, and the device's start point.

Server -> device (one message per node; a node the server has heard from gets only its member's keys):

* ``msg.content["base"]``  ArrayRecord: the cloud's cumulative base (folded into the frozen weights,
  W0 += scaling·B@A per module) **as a change**: with config ``base-mode = "add"`` it is the increment
  from version ``base-from`` (which the device holds) to ``base-version``; with ``"replace"`` it is the
  whole cumulative base (a device the server has no version for: a new one, or after a resume). The
  device keeps the cumulative base it holds (and its version) in its state, so a round sends what
  changed, not the whole history. Empty for methods that keep everything in the factors (FedIT).
* ``msg.content["edge-base"]`` ArrayRecord: with an edge tier, the edge's base relative to the cloud's
  within the current cloud round (folded for this round only; empty otherwise).
* ``msg.content["lora"]``  ArrayRecord: the tier's global adapter at its own (global) rank, the same
  for every device of the tier. The device cuts it to its rank itself (:func:`device_start`), with the
  rule named in the config: ``truncation`` (``svd`` | ``prefix``), ``fold-remainder`` (fold what its
  rank cannot hold into its base: every device starts from exactly the tier's model) and
  ``reinit-lora`` (fold everything, start a fresh LoRA). The server repeats the same pure computation
  when the reply comes back, so it needs no per-device state to build a message.
* ``msg.content["config"]`` ConfigRecord: round number, local steps, learning rate, the keys above.

Device -> server (reply):

* ``"lora"``    ArrayRecord: the trained factors (A, B) and their scaling.
* ``"metrics"`` MetricRecord: ``num-examples`` (the aggregation weight), ``train-loss``, ...
* ``"profile"`` ConfigRecord: ``member``, ``edge-id``, ``lora-rank``, ``lora-alpha``, ``base-version``
  (so the server learns each node's profile and which base it holds).

Arrays are keyed ``<module path>::A``, ``<module path>::B`` and ``<module path>::scaling`` (a 1-element
array), module paths in the backbone's naming (``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors

BASE, LORA, CONFIG, METRICS, PROFILE = "base", "lora", "config", "metrics", "profile"
EDGE_BASE = "edge-base"
NUM_EXAMPLES = "num-examples"
_SUFFIXES = ("::A", "::B", "::scaling")


def update_to_arrays(update: AdapterUpdate, modules: set[str] | None = None) -> ArrayRecord:
    """Pack an update (optionally only ``modules``) as an ArrayRecord of float32 factors."""
    record = ArrayRecord()
    for key, f in update.layers.items():
        if modules is not None and key not in modules:
            continue
        record[f"{key}::A"] = Array(f.A.detach().float().cpu().numpy())
        record[f"{key}::B"] = Array(f.B.detach().float().cpu().numpy())
        record[f"{key}::scaling"] = Array(np.asarray([f.scaling], dtype=np.float64))
    return record


def arrays_to_update(record: ArrayRecord, num_examples: int = 0, member: str = "") -> AdapterUpdate:
    """Unpack an ArrayRecord written by :func:`update_to_arrays`; raises ValueError if malformed."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key in record.keys():
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix] = record[key].numpy()
                break
        else:
            raise ValueError(f"unexpected array '{key}' in an adapter record")
    layers = {}
    for module, p in parts.items():
        if len(p) != 3:
            raise ValueError(f"module '{module}' lacks {sorted(set(_SUFFIXES) - set(p))}")
        A, B = torch.from_numpy(p["::A"].copy()), torch.from_numpy(p["::B"].copy())
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"module '{module}' has mismatched factor shapes A{tuple(A.shape)} B{tuple(B.shape)}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"module '{module}' has NaN or Inf values")
        layers[module] = LoraFactors(A, B, float(p["::scaling"].reshape(-1)[0]))
    return AdapterUpdate(layers=layers, num_examples=num_examples, member=member)


@dataclass
class StartPoint:
    """What a device starts a round from: ``fold`` (into the frozen weights), ``lora`` (at its rank), and
    the cumulative base it holds afterwards with its version."""

    fold: dict[str, LoraFactors]
    lora: dict[str, LoraFactors]
    held_base: dict[str, LoraFactors]
    base_version: int


def device_start(
    *,
    held_base: dict[str, LoraFactors],
    held_version: int,
    base: dict[str, LoraFactors],
    base_mode: str,
    base_from: int,
    base_version: int,
    edge_base: dict[str, LoraFactors],
    adapter: dict[str, LoraFactors],
    truncation: str,
    fold_remainder: bool,
    reinit_lora: bool,
    rank: int,
    alpha: float,
) -> StartPoint:
    """The device's side of the downlink (see the module docstring); pure, and the server repeats the
    adapter part (:meth:`aiflow_fl.aggregation.common.Aggregate.for_rank`) to know what a device folded.

    Raises ValueError when an increment does not start from the version the device holds (its state
    was lost): the server then leaves it out and sends it the whole base next time.
    """
    from aiflow_fl.aggregation import lowrank
    from aiflow_fl.aggregation.common import Aggregate

    if base_mode == "replace":
        held = dict(base)
    elif base_mode == "add":
        if held_version != base_from:
            raise ValueError(f"base out of sync: this device holds base version {held_version}, the server sent the "
                             f"change from version {base_from}")
        held = lowrank.add([held_base, base]) if base else dict(held_base)
    else:
        raise ValueError(f"base-mode is '{base_mode}', not 'replace' or 'add'")
    view = Aggregate(adapter=adapter, truncation=truncation, fold_remainder=fold_remainder, reinit_lora=reinit_lora)
    extra, lora = view.for_rank(rank, alpha / rank)
    fold = lowrank.add([held, edge_base, extra])
    return StartPoint(fold=fold, lora=lora, held_base=held, base_version=base_version)
