"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", arXiv 2403.12313).

A is frozen at its initialisation and shared by all clients; only B is trained and averaged:
``B̄ = Σ p_k s_k B_k`` so ``B̄ A = Σ p_k s_k B_k A`` exactly, with half the uplink (rm) and noise that
does not multiply through two trained factors under DP. Heterogeneous ranks share the rows of one
A_max (a rank-r client uses ``A_max[:r]``): B is zero-padded, averaged, and a client gets
``B̄[:, :r]``, the rest folded into its base.

The first round has no shared A yet (each client drew its own): when the clients' A disagree, the
exact residual ``Σ p_k s_k B_k A_k − B̄ A_max`` is folded into the base, so the merge is exact and A_max
(the largest-rank client's A) is shared from then on. Clients must keep A frozen (the strategy sends
``freeze-lora-a = True``); a client that does not is corrected the same way and logged.
"""

from __future__ import annotations

import torch

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, aligned, counts
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    adapter, base, disagreeing = {}, {}, 0
    for key, g in groups.items():
        shared = max(g.factors, key=lambda f: f.rank).A.double()
        rank = shared.shape[0]
        B = sum(w * lowrank.pad_rank(f, rank)[0] for f, w in zip(g.factors, g.weights))
        adapter[key] = LoraFactors(shared.float().clone(), B.float(), 1.0)  # type: ignore[union-attr]
        if not all(torch.allclose(f.A.double(), shared[: f.rank], rtol=0, atol=1e-7) for f in g.factors):
            disagreeing += 1
            pairs = [lowrank.scaled(f, w) for f, w in zip(g.factors, g.weights)]
            base[key] = lowrank.refactor(pairs + [(-B, shared)])  # type: ignore[operator]
    return Aggregate(
        adapter=adapter,
        base=base,
        **counts(updates, groups),
        truncation="prefix",
        fold_remainder=True,
        keep_factors_upward=True,
        metrics={"ffa-keys-with-unshared-a": float(disagreeing)},
    )
