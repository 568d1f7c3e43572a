"""FedEx-LoRA (arXiv 2410.09432): FedIT factors plus the example-weighted residual folded into the base (exact).

The math is :mod:`aiflow_fl.aggregation.fedexlora`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import fedexlora
from strategies.base import LoraStrategy


class FedExLoRA(LoraStrategy):
    """FedEx-LoRA (arXiv 2410.09432): FedIT factors plus the example-weighted residual folded into the base (exact)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=fedexlora.aggregate, name="fedexlora", **kwargs)
