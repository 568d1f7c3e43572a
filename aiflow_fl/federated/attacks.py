"""Poisoned devices for robustness studies (``federation.attack_fraction``, ``attack``, ``attack_scale``).

Who attacks is a function of the device's partition id alone (no list of N anywhere): device ``i`` is
an attacker when ``u(seed, i) < attack_fraction``, with ``u`` a uniform number in [0, 1) from the
SHA-256 of ``"{seed}:{i}"``; so about that fraction of the devices sampled in any round attack, the
same devices every round and in every process.

What an attacker sends: its *change* of the adapter this round, multiplied by ``c = attack_scale``
(``scale``: the boosted update of model replacement, Bagdasaryan et al. 2020) or by ``-c``
(``signflip``: the sign-flipping Byzantine update, e.g. Li et al. 2019 "RSA"), on top of the adapter
it was sent. With P₀ = s₀B₀A₀ the start (the server's adapter at the device's rank) and P = s·B·A
after local training, the poisoned adapter is ``P₀ + c'·(P − P₀)``, c' = ±c, as exact factors
(the two pairs side by side, rank ≤ 2r). A mean (FedAvg) then moves by ``(1-f)·Δ - f·c·Δ`` for an
attacking share f and honest change Δ — for f = 0.2, c = 10 that is −1.2·Δ, the wrong way — while a
coordinate-wise median or trimmed mean keeps the honest majority's values (Yin et al. 2018).
(Scaling the whole adapter P instead, as an earlier version did, also flips the server's model
from round 2 on: a different, stronger attack than the one named.)
"""

from __future__ import annotations

import hashlib

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.errors import AiflowError

ATTACKS = ("scale", "signflip")


def attack_draw(seed: int, partition_id: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, partition id)."""
    digest = hashlib.sha256(f"{seed}:{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_attacker(seed: int, partition_id: int, fraction: float) -> bool:
    return fraction > 0 and attack_draw(seed, partition_id) < fraction


def poison(update: AdapterUpdate, attack: str, scale: float, start: dict[str, LoraFactors] | None = None) -> AdapterUpdate:
    """The attacker's version of ``update``: ``P₀ + c'·(P − P₀)`` per key with c' = ``scale`` or
    ``-scale`` (see module doc); ``start[key]`` gives P₀ (absent: zero, a fresh LoRA's product)."""
    if attack not in ATTACKS:
        raise AiflowError(f"federation.attack is '{attack}', which is not one of: {', '.join(ATTACKS)}.")
    factor = scale if attack == "scale" else -scale
    start = start or {}
    layers = {}
    for key, f in update.layers.items():
        moved = LoraFactors(f.A.clone(), f.B * factor, f.scaling)  # c'·P
        s0 = start.get(key)
        if s0 is None or float(s0.B.abs().max()) == 0.0:  # P₀ = 0: the change is P itself
            layers[key] = moved
        else:  # c'·P + (1 − c')·P₀, the device's components first
            layers[key] = lowrank.concat([moved, LoraFactors(s0.A, s0.B * (1.0 - factor), s0.scaling)])
    return AdapterUpdate(layers, update.num_examples, member=update.member, metrics=dict(update.metrics))
