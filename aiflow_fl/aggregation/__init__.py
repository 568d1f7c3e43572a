"""Aggregation of aligned low-rank updates: pure tensor math, no Flower, files or networks.

``METHODS[name](updates) -> Aggregate`` for every method aiflow-fl offers (``strategy=NAME`` in the
config); see :mod:`aiflow_fl.aggregation.common` for the contract and the layer alignment, and each
method's module for its paper and algorithm.
"""

from aiflow_fl.aggregation import fedexlora, fedit, ffa, flexlora, flora, hetlora, robust
from aiflow_fl.aggregation.common import Aggregate, aligned
from aiflow_fl.aggregation.hierarchy import edge_update, hierarchical
from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors, from_peft_state_dict, to_peft_state_dict

METHODS = {
    "fedavg": flexlora.aggregate,  # example-weighted FedAvg of the products ΔW_k (exact)
    "fedit": fedit.aggregate,
    "ffa": ffa.aggregate,
    "flora": flora.aggregate,
    "flexlora": flexlora.aggregate,
    "hetlora": hetlora.aggregate,
    "fedexlora": fedexlora.aggregate,
    "median": robust.median,
    "trimmed_mean": robust.trimmed_mean,
}
# Methods whose merged update equals Σ p_k s_k B_k A_k (and so compose exactly through edges).
EXACT_METHODS = ("fedavg", "ffa", "flora", "flexlora", "fedexlora")

__all__ = [
    "METHODS",
    "EXACT_METHODS",
    "Aggregate",
    "AdapterUpdate",
    "LoraFactors",
    "aligned",
    "edge_update",
    "hierarchical",
    "from_peft_state_dict",
    "to_peft_state_dict",
]
