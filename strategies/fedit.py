"""FedIT (arXiv 2305.05644): example-weighted average of A and of s·B separately (inexact: B̄Ā ≠ Σ p_k s_k B_k A_k).

The math is :mod:`aiflow_fl.aggregation.fedit`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import fedit
from strategies.base import LoraStrategy


class FedIT(LoraStrategy):
    """FedIT (arXiv 2305.05644): example-weighted average of A and of s·B separately (inexact: B̄Ā ≠ Σ p_k s_k B_k A_k)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=fedit.aggregate, name="fedit", **kwargs)
