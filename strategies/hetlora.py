"""HetLoRA (arXiv 2401.06432): zero-padding, sparsity-weighted average, rank truncation (inexact).

The math is :mod:`aiflow_fl.aggregation.hetlora`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import hetlora
from strategies.base import LoraStrategy


class HetLoRA(LoraStrategy):
    """HetLoRA (arXiv 2401.06432): zero-padding, sparsity-weighted average, rank truncation (inexact)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=hetlora.aggregate, name="hetlora", **kwargs)
