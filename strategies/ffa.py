"""FFA-LoRA (arXiv 2403.12313): A frozen and shared, only B trained and averaged (exact, half the uplink).

The math is :mod:`aiflow_fl.aggregation.ffa`; the Flower plumbing is :class:`strategies.base.LoraStrategy`.
"""

from __future__ import annotations

from typing import Any

from aiflow_fl.aggregation import ffa
from strategies.base import LoraStrategy


class FFALoRA(LoraStrategy):
    """FFA-LoRA (arXiv 2403.12313): A frozen and shared, only B trained and averaged (exact, half the uplink)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("freeze_lora_a", True)
        super().__init__(method=ffa.aggregate, name="ffa", **kwargs)
