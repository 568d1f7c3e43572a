"""FedAvg of adapters done right: the example-weighted mean of the products ``Σ p_k s_k B_k A_k``.

Averaging A and B separately (what a stock ``FedAvg`` does to LoRA state dicts) is FedIT and is not the
average of the clients' models. This strategy averages the products exactly (FlexLoRA's rule,
:mod:`aiflow_fl.aggregation.flexlora`): each client gets the best rank-r factors of the mean and the
rest folded into its base.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import flexlora
from strategies.base import LoraStrategy


class FedAvgProducts(LoraStrategy):
    """Exact example-weighted FedAvg of the low-rank products (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=flexlora.aggregate, name="fedavg", **kwargs)
