"""Iteration-level batch scheduling of generation requests (Orca, Yu et al., OSDI 2022).

Requests that arrive while others run join the batch at the next decoding step instead of waiting
for the whole batch to finish; a finished, stopped or cancelled request leaves at the step it ends,
freeing its slot at once. This module is only the bookkeeping (who is waiting, who runs, when one is
done, what it emits); :mod:`aiflow_fl.serving.api.batch` runs the forwards. Nothing here touches a
model, so the policy is tested on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aiflow_fl.serving.api.sampling import next_token
from aiflow_fl.serving.api.text import TextStream


@dataclass
class Event:
    """What a request's consumer receives: new ``text`` (+ its ``token_ids``), then one final event
    with ``finish_reason`` (``stop`` | ``length``) or an ``error`` (status, message)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[int, str] | None = None
    extra: dict | None = None  # chains: per-link acceptance and bytes; verified or not

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Sequence:
    """One request in the scheduler: its prompt, limits, sampling settings and output sink."""

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    stream: TextStream
    eos: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    def choose(self, logits: torch.Tensor) -> int:
        return next_token(logits, self.temperature, self.top_p, self.generator)

    def record(self, token: int) -> None:
        """Append one generated token, emit its text, and end the request if it is the last."""
        if self.done:
            return
        self.generated.append(token)
        ended = "stop" if token in self.eos else "length" if len(self.generated) >= self.max_new_tokens else None
        text = self.stream.push([] if token in self.eos else [token])
        if self.stream.stopped:
            ended = "stop"
        if ended is not None:
            text += self.stream.finish()
            self.finish_reason = ended
        self.emit(Event(text=text, token_ids=[token], finish_reason=ended))


class Scheduler:
    """Waiting queue + running batch of at most ``max_batch`` sequences (module docstring)."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots (cancelled ones are dropped); returns the new ones,
        which are appended at the end of ``running`` in that order."""
        new = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            if not seq.cancelled.is_set():
                self.running.append(seq)
                new.append(seq)
        return new

    def retire(self) -> list[int]:
        """Remove finished and cancelled sequences; returns the batch rows that stay, in order."""
        keep = [i for i, seq in enumerate(self.running) if not seq.done]
        self.running = [self.running[i] for i in keep]
        return keep

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
