"""Poisoned devices for robustness studies (``federation.attack_fraction``, ``attack``, ``attack_scale``).

Who attacks is a function of the device's partition id alone (no list of N anywhere): device ``i`` is
an attacker when ``u(seed, i) < attack_fraction``, with ``u`` a uniform number in [0, 1) from the
SHA-256 of ``"{seed}:{i}"``; so about that fraction of the devices sampled in any round attack, the
same devices every round and in every process.

What an attacker sends: its LoRA update (the adapter relative to the base it started from, which is
what the aggregation rules combine) multiplied by ``c = attack_scale`` (``scale``: the boosted update
of model replacement, Bagdasaryan et al. 2020) or by ``-c`` (``signflip``: the sign-flipping
Byzantine update, e.g. Li et al. 2019 "RSA"). ΔW = s·B·A, so scaling B scales ΔW exactly and keeps
every shape. A mean (FedAvg) moves by ``(1-f)·Δ - f·c·Δ`` for an attacking share f — for f = 0.2,
c = 10 that is −1.2·Δ, the wrong way — while a coordinate-wise median or trimmed mean keeps the
honest majority's values (Yin et al. 2018).
"""

from __future__ import annotations

import hashlib

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.errors import AiflowError

ATTACKS = ("scale", "signflip")


def attack_draw(seed: int, partition_id: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, partition id)."""
    digest = hashlib.sha256(f"{seed}:{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_attacker(seed: int, partition_id: int, fraction: float) -> bool:
    return fraction > 0 and attack_draw(seed, partition_id) < fraction


def poison(update: AdapterUpdate, attack: str, scale: float) -> AdapterUpdate:
    """The attacker's version of ``update``: ΔW multiplied by ``scale`` or ``-scale`` (see module doc)."""
    if attack not in ATTACKS:
        raise AiflowError(f"federation.attack is '{attack}', which is not one of: {', '.join(ATTACKS)}.")
    factor = scale if attack == "scale" else -scale
    layers = {k: LoraFactors(f.A.clone(), f.B * factor, f.scaling) for k, f in update.layers.items()}
    return AdapterUpdate(layers, update.num_examples, member=update.member, metrics=dict(update.metrics))
