"""Network links between tiers: latency, bandwidth and jitter applied to the real bytes exchanged.

The time one message of ``b`` bytes takes is ``latency + 8·b / bandwidth + jitter·|N(0, 1)|``
(half-normal jitter, seeded). In-process chains *sleep* that long per message (so wall-clock tokens/s
include the network); multi-process chains sleep it on top of the real loopback transfer. Every link
counts its bytes and messages in both directions.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from aiflow_fl.errors import AiflowError


@dataclass
class Link:
    name: str = "link"
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0  # 0: infinite
    jitter_ms: float = 0.0
    seed: int = 0
    bytes_up: int = 0  # towards the verifier
    bytes_down: int = 0  # back to the drafter
    messages: int = 0
    delay_s: float = 0.0  # total simulated time spent on this link
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("latency_ms", "bandwidth_mbps", "jitter_ms"):
            if getattr(self, key) < 0:
                raise AiflowError(f"Link '{self.name}': {key} must be ≥ 0 (got {getattr(self, key)}).")
        self._rng = random.Random(self.seed)

    @property
    def is_zero(self) -> bool:
        return self.latency_ms == 0 and self.bandwidth_mbps == 0 and self.jitter_ms == 0

    def message_time(self, nbytes: int) -> float:
        """Seconds one message of ``nbytes`` takes (see module docstring)."""
        seconds = self.latency_ms / 1e3
        if self.bandwidth_mbps > 0:
            seconds += 8 * nbytes / (self.bandwidth_mbps * 1e6)
        if self.jitter_ms > 0:
            seconds += abs(self._rng.gauss(0.0, 1.0)) * self.jitter_ms / 1e3
        return seconds

    def send(self, nbytes: int, up: bool, sleep: bool = True) -> float:
        """Account one message and (by default) wait for its simulated transfer time."""
        if up:
            self.bytes_up += nbytes
        else:
            self.bytes_down += nbytes
        self.messages += 1
        seconds = self.message_time(nbytes)
        self.delay_s += seconds
        if sleep and seconds > 0:
            time.sleep(seconds)
        return seconds

    def stats(self) -> dict[str, float | int | str]:
        return {
            "link": self.name,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "messages": self.messages,
            "delay_s": round(self.delay_s, 4),
        }

    def reset_stats(self) -> None:
        self.bytes_up = self.bytes_down = self.messages = 0
        self.delay_s = 0.0


def tensor_bytes(n_positions: int, hidden_size: int | None, dtype_bytes: int = 4) -> int:
    """Payload of one message: hidden states (n × H floats) or token ids (n × int32)."""
    return n_positions * (hidden_size * dtype_bytes if hidden_size else 4)
