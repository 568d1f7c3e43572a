"""What every aggregation method returns, and the per-key (layer) alignment they all share.

**Inputs.** Each :class:`AdapterUpdate` is a device's (or an edge's) adapter *relative to the base the
aggregating tier sent it*: its LoRA factors after local training (which already include the factors it
started from) plus, when the tier folded part of its adapter into that node's base, that part
(see :meth:`Aggregate.for_rank`). Weights are ``num_examples``.

**Layer alignment.** Keys are opaque strings (backbone module paths, or family-wide keys mapped by the
family's ``align_key``). A key is aggregated over exactly the updates that have it, with the example
weights renormalised over them: ``p_k(key) = n_k / Σ_{j has key} n_j``. A shallow member therefore only
moves the layers it has, and an EESB branch or HPCD component is merged among the members that share it.

**Output.** An :class:`Aggregate` says what the next round starts from:

* ``base``    — an increment folded into the frozen weights (cumulative on the server); the dense
  residual of FedEx-LoRA, FLoRA's stacked product, FFA-LoRA's bootstrap;
* ``adapter`` — the global LoRA factors on top of the new base (empty when clients re-initialise);
* ``for_rank(r, s)`` — the factors a rank-r client (scaling s) starts from, and, for methods with
  ``fold_remainder``, the exact remainder ``adapter − lora_r`` folded into that client's base.

The server's model after the round is ``W0 + Σ bases + adapter``; :meth:`Aggregate.merged` gives
``base + adapter`` as factors, which is what the tests compare with ``Σ p_k s_k B_k A_k``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors

Layers = dict[str, LoraFactors]


@dataclass
class Aggregate:
    """The result of one aggregation (see the module docstring)."""

    adapter: Layers
    base: Layers = field(default_factory=dict)
    num_examples: int = 0
    key_examples: dict[str, int] = field(default_factory=dict)  # examples behind each key
    reinit_lora: bool = False  # clients start each round from a fresh LoRA (FLoRA)
    fold_remainder: bool = False  # what a client's rank cannot hold is folded into its base
    truncation: str = "svd"  # how the adapter is cut to a client's rank: "svd" | "prefix"
    keep_factors_upward: bool = False  # an edge forwards the adapter's factors as they are (FFA's shared A)
    metrics: dict[str, float] = field(default_factory=dict)

    def merged(self) -> Layers:
        """Exact factors of ``base + adapter`` per key: the round's merged update."""
        return lowrank.add([self.base, self.adapter])

    def lora_for_rank(self, key: str, rank: int, scaling: float) -> LoraFactors:
        """The rank-``rank`` factors of ``adapter[key]`` a client starts from, in its scaling.

        "svd": best rank-r approximation (FlexLoRA); "prefix": the first r components (HetLoRA,
        FedIT with heterogeneous ranks, FFA-LoRA's shared A). Missing components are padded with a
        fresh LoRA pair (random A row, zero B column), so the product is unchanged and every
        component stays trainable (an all-zero pair would have zero gradient forever).
        """
        f = self.adapter[key]
        if self.truncation == "svd":
            f = lowrank.refactor([lowrank.scaled(f)], max_rank=rank)
        else:
            f = lowrank.first_components(f, rank)
        if f.rank < rank:
            f = _pad_fresh(f, rank, key)
        return lowrank.with_scaling(f, scaling)

    def for_rank(self, rank: int | None, scaling: float, keys: set[str] | None = None) -> tuple[Layers, Layers]:
        """(extra base, lora init) for a client of ``rank`` (None: unknown node) restricted to ``keys``.

        An unknown node, or a method that re-initialises LoRA, gets the whole adapter folded into
        its base and no LoRA (it starts a fresh one): its model is exactly the server's.
        """
        extra: Layers = {}
        lora: Layers = {}
        for key in sorted(self.adapter):
            if keys is not None and key not in keys:
                continue
            if rank is None or self.reinit_lora:
                extra[key] = self.adapter[key]
                continue
            lora[key] = self.lora_for_rank(key, rank, scaling)
            if not self.fold_remainder:
                continue
            full = self.adapter[key]
            if self.truncation == "prefix":
                # the components after the first r, exactly (keeps FFA's shared A rows intact)
                if full.rank > rank:
                    extra[key] = LoraFactors(full.A[rank:].clone(), full.B[:, rank:].clone(), full.scaling)
            else:
                remainder = lowrank.difference(full, lora[key])
                if float(remainder.B.abs().max()) > 0.0:
                    extra[key] = remainder
        return extra, lora


def _pad_fresh(f: LoraFactors, rank: int, key: str) -> LoraFactors:
    """Append peft-style fresh components (A ~ U(±1/√in), B = 0), seeded by the key for reproducibility."""
    extra = rank - f.rank
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(f.A.shape[1])
    A_new = (torch.rand(extra, f.A.shape[1], generator=gen) * 2 - 1) * bound
    return LoraFactors(
        torch.cat([f.A.float(), A_new]), torch.cat([f.B.float(), f.B.new_zeros(f.B.shape[0], extra).float()], dim=1), f.scaling
    )


@dataclass
class KeyGroup:
    """The updates that have one key: their factors and example weights renormalised over them."""

    factors: list[LoraFactors]
    weights: list[float]  # Σ = 1
    num_examples: int


def aligned(updates: list[AdapterUpdate]) -> dict[str, KeyGroup]:
    """Group the updates' factors by key, weights ``n_k / Σ_{j has key} n_j`` (layer alignment).

    Raises ValueError if two updates disagree on a key's (out, in) shape, or all weights are zero.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    groups: dict[str, tuple[list[LoraFactors], list[int]]] = {}
    for u in updates:
        if u.num_examples < 0:
            raise ValueError(f"negative num_examples {u.num_examples}")
        for key, f in u.layers.items():
            fs, ns = groups.setdefault(key, ([], []))
            if fs and (fs[0].B.shape[0], fs[0].A.shape[1]) != (f.B.shape[0], f.A.shape[1]):
                raise ValueError(
                    f"key '{key}' has shape {(f.B.shape[0], f.A.shape[1])} in one update and "
                    f"{(fs[0].B.shape[0], fs[0].A.shape[1])} in another"
                )
            fs.append(f)
            ns.append(u.examples_for(key))
    out = {}
    for key, (fs, ns) in groups.items():
        total = sum(ns)
        if total <= 0:
            raise ValueError(f"key '{key}': all updates have zero examples")
        out[key] = KeyGroup(fs, [n / total for n in ns], total)
    return out


def counts(updates: list[AdapterUpdate], groups: dict[str, KeyGroup]) -> dict:
    """``num_examples`` and per-key ``key_examples`` of an aggregate (so an edge's update keeps them)."""
    return {"num_examples": sum(u.num_examples for u in updates), "key_examples": {k: g.num_examples for k, g in groups.items()}}


def weighted_product(group: KeyGroup, max_rank: int | None = None) -> LoraFactors:
    """Exact factors of ``Σ_k p_k s_k B_k A_k`` for one key (stacking, then re-factorising)."""
    return lowrank.refactor([lowrank.scaled(f, w) for f, w in zip(group.factors, group.weights)], max_rank)


def padded_mean(group: KeyGroup, weights: list[float] | None = None) -> LoraFactors:
    """FedIT-style factor averages ``(Σ w_k A_k, Σ w_k s_k B_k)``, zero-padded to the largest rank."""
    weights = group.weights if weights is None else weights
    rank = max(f.rank for f in group.factors)
    B = sum(w * lowrank.pad_rank(f, rank)[0] for f, w in zip(group.factors, weights))
    A = sum(w * lowrank.pad_rank(f, rank)[1] for f, w in zip(group.factors, weights))
    return LoraFactors(A.float(), B.float(), 1.0)  # type: ignore[union-attr]
