"""FLoRA (arXiv 2409.05976): stacked factors, exact for heterogeneous ranks; folded into the base, fresh LoRA each round.

The math is :mod:`aiflow_fl.aggregation.flora`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import flora
from strategies.base import LoraStrategy


class FLoRA(LoraStrategy):
    """FLoRA (arXiv 2409.05976): stacked factors, exact for heterogeneous ranks; folded into the base, fresh LoRA each round."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=flora.aggregate, name="flora", **kwargs)
