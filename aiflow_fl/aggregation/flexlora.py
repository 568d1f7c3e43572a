"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", arXiv 2402.11505).

Form the weighted sum of products ``ΔW = Σ p_k s_k B_k A_k`` (held as exact stacked factors, the server
never needs the m×n matrix) and give each client the truncated SVD of ``ΔW`` at its own rank
(``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ``). What the client's rank cannot hold, ``ΔW − trunc_r(ΔW)``, is
folded into that client's base (aiflow-fl's wire contract), so every client starts from exactly the
global model and trains its top-r directions; without the fold this is the paper's variant.

``fedavg`` in aiflow-fl is this rule: the example-weighted FedAvg of the products.
"""

from __future__ import annotations

from aiflow_fl.aggregation.common import Aggregate, aligned, counts, weighted_product
from aiflow_fl.aggregation.update import AdapterUpdate


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    adapter = {key: weighted_product(g) for key, g in groups.items()}
    return Aggregate(adapter=adapter, **counts(updates, groups), truncation="svd", fold_remainder=True)
