"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", arXiv 2409.05976).

Stack the clients' factors, ``B = [p_1 s_1 B_1 … p_K s_K B_K]``, ``A = [A_1; …; A_K]``, so that
``B A = Σ p_k s_k B_k A_k`` exactly, whatever each client's rank. The stacked product is folded into
the frozen weights and every client starts the next round from a fresh LoRA of its own rank, so the
downlink grows with the number of clients. Here the stack is re-factorised to its numerical rank
before it is sent (same product, fewer bytes when ranks overlap).
"""

from __future__ import annotations

from aiflow_fl.aggregation.common import Aggregate, aligned, counts, weighted_product
from aiflow_fl.aggregation.update import AdapterUpdate


def aggregate(updates: list[AdapterUpdate]) -> Aggregate:
    groups = aligned(updates)
    base = {key: weighted_product(g) for key, g in groups.items()}
    return Aggregate(adapter={}, base=base, **counts(updates, groups), reinit_lora=True)
