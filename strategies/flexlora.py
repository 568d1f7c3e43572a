"""FlexLoRA (arXiv 2402.11505): weighted sum of products, truncated SVD to each client's rank, the rest folded into its base.

The math is :mod:`aiflow_fl.aggregation.flexlora`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import flexlora
from strategies.base import LoraStrategy


class FlexLoRA(LoraStrategy):
    """FlexLoRA (arXiv 2402.11505): weighted sum of products, truncated SVD to each client's rank, the rest folded into its base."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=flexlora.aggregate, name="flexlora", **kwargs)
