"""What crosses the wire in a federated round: record names and (un)packing of adapter updates.

Server -> device (one message per node; a node gets only the modules its member has):

* ``msg.content["base"]``  ArrayRecord: an update to fold into the member's frozen weights before
  training (W0 += scaling·B@A per module), cumulative since the start of the run. Empty when the
  method keeps everything in the LoRA factors (FedIT, FFA-LoRA). Used by FLoRA (stacked product) and
  FedEx-LoRA (residual), and by FlexLoRA for what the client's rank cannot hold.
* ``msg.content["lora"]``  ArrayRecord: the LoRA factors the device starts this round from (its own
  rank). Empty in the first round or when the method re-initialises LoRA each round (FLoRA).
* ``msg.content["config"]`` ConfigRecord: round number, local steps, learning rate, ...

Device -> server (reply):

* ``"lora"``    ArrayRecord: the trained factors (A, B) and their scaling.
* ``"metrics"`` MetricRecord: ``num-examples`` (the aggregation weight), ``train-loss``, ...
* ``"profile"`` ConfigRecord: ``member``, ``edge-id``, ``lora-rank``, ``lora-alpha`` (so the server
  learns each node's profile from its first reply and sends per-node slices afterwards).

Arrays are keyed ``<module path>::A``, ``<module path>::B`` and ``<module path>::scaling`` (a 1-element
array), module paths in the backbone's naming (``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors

BASE, LORA, CONFIG, METRICS, PROFILE = "base", "lora", "config", "metrics", "profile"
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
