"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", arXiv 2305.05644).

Average the factors separately: ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k s_k B_k`` (each client's scaling
``s_k = alpha_k / r_k`` is folded into its B so clients with different alpha are honoured). The merged
update ``B̄ Ā`` is **not** ``Σ p_k s_k B_k A_k`` (the cross terms ``p_i p_j B_i A_j`` do not vanish); this
is the error FedEx-LoRA and FLoRA correct. Heterogeneous ranks are zero-padded to the largest and each
client takes the first ``r_k`` components back (as HetLoRA does, without its sparsity weights).

Unlike FLoRA's own FedIT baseline (which, by a typo, keeps a single client's factors) every client
enters the mean with its example weight.
"""

from __future__ import annotations

from aiflow_fl.aggregation.common import Aggregate, aligned, padded_mean, counts
from aiflow_fl.aggregation.update import AdapterUpdate


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    adapter = {key: padded_mean(g) for key, g in groups.items()}
    return Aggregate(adapter=adapter, **counts(updates, groups), truncation="prefix")
