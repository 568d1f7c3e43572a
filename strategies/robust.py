"""Robust aggregation for untrusted devices: coordinate-wise median or trimmed mean of the products.

The math is :mod:`aiflow_fl.aggregation.robust`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiflow_fl.aggregation import robust
from strategies.base import LoraStrategy


class Median(LoraStrategy):
    """Coordinate-wise median of the clients' ΔW (Yin et al., arXiv 1803.01498), re-factorised per rank."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(method=robust.median, name="median", **kwargs)


class TrimmedMean(LoraStrategy):
    """Coordinate-wise β-trimmed mean of the clients' ΔW (Yin et al., arXiv 1803.01498)."""

    def __init__(self, trim_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(method=partial(robust.trimmed_mean, trim_fraction=trim_fraction), name="trimmed_mean", **kwargs)
