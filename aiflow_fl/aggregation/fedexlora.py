"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", arXiv 2410.09432).

FedIT's factor averages ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k s_k B_k`` stay the trainable adapter, and the
residual ``Σ p_k s_k B_k A_k − B̄ Ā`` is folded into the frozen weights, so the merged model is exact:
``B̄ Ā + residual = Σ p_k s_k B_k A_k``. Both the means and the residual are weighted by examples with
the same ``p_k``, and every product carries its client's LoRA scaling ``s_k = α_k / r_k``.

About the public FedLLM-Factory code, as an outside check of its aggregation found it: its
``alg/fedexlora.py`` also weights the residual by examples (an earlier version of this docstring said
it used an unweighted mean; that was wrong). What it misses is the ``α/r`` scaling: it forms the
residual from the raw products ``B_k A_k``, so the merged update is off by the scaling (and, with
clients of different ``α/r``, not even proportional to the right one). Its FLoRA stacks unscaled
factors in the same way, and its FlexLoRA puts the whole ``Σ`` of the SVD on ``B`` (``B = UΣ``,
``A = Vᵀ``) where this code splits ``Σ^½`` over both factors. ``tests/test_aggregation.py`` pins the
property that matters: with heterogeneous ``α/r`` and data sizes the merge equals
``Σ p_k s_k B_k A_k``, and the unscaled rule does not.

The residual is kept as exact factors ``[p_1 s_1 B_1 … p_K s_K B_K, −B̄]·[A_1; …; A_K; Ā]``
re-factorised to its numerical rank (≤ Σ r_k + r_max), not as a dense m×n matrix. Heterogeneous ranks:
zero-padding, the first ``r_k`` components back to each client and the rest folded into its base
(still exact).
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
