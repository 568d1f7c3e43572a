"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", arXiv 2410.09432).

FedIT's factor averages ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k s_k B_k`` stay the trainable adapter, and the
residual ``Σ p_k s_k B_k A_k − B̄ Ā`` is folded into the frozen weights, so the merged model is exact.
The residual is **weighted by examples** with the same ``p_k`` as the means (the public FedLLM-Factory
``alg/fedexlora.py`` uses an unweighted mean there, which is not exact for unequal data sizes). It is
kept as exact factors ``[p_1 s_1 B_1 … p_K s_K B_K, −B̄]·[A_1; …; A_K; Ā]`` re-factorised to its
numerical rank (≤ Σ r_k + r_max), not as a dense m×n matrix. Heterogeneous ranks: zero-padding, the
first ``r_k`` components back to each client and the rest folded into its base (still exact).
"""

from __future__ import annotations

from aiflow_fl.aggregation import lowrank
from aiflow_fl.aggregation.common import Aggregate, aligned, padded_mean, counts
from aiflow_fl.aggregation.update import AdapterUpdate


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    adapter, base = {}, {}
    for key, g in groups.items():
        mean = padded_mean(g)
        adapter[key] = mean
        pairs = [lowrank.scaled(f, w) for f, w in zip(g.factors, g.weights)]
        base[key] = lowrank.refactor(pairs + [(-mean.B.double(), mean.A.double())])
    return Aggregate(
        adapter=adapter, base=base, **counts(updates, groups), truncation="prefix", fold_remainder=True
    )
