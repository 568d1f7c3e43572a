"""A Grid that watches the round: live progress, per-client timeouts and the replies' metrics.

Flower strategies call ``grid.send_and_receive(messages, timeout=...)`` and block until every reply
is in or the timeout passes. :class:`WatchedGrid` wraps the real Grid (simulation or deployment) and
does the same push-then-poll itself, so that it can (1) advance a rich progress view as each client
answers (round, clients done, last loss), (2) log the nodes that did not answer in time — they are
simply absent from the replies and so left out of that round's aggregation — and (3) keep each
round's successful train replies' metrics for the run folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from aiflow_fl.protocol import METRICS

_POLL_S = 0.1


class WatchedGrid(Grid):
    """Delegates to ``inner``; ``send_and_receive`` reports progress and per-node timeouts."""

    def __init__(self, inner: Grid, progress: Any = None, label: str = "round") -> None:
        self.inner = inner
        self.progress = progress  # a rich.progress.Progress, or None for log lines only
        self.label = label
        self.round_offset = 0  # rounds already done before this run started (resume)
        self.calls = 0
        self.train_rounds = 0
        self.client_metrics: dict[int, list[dict[str, float]]] = {}  # train round -> replies' metrics
        self.failures: dict[int, list[str]] = {}  # train round -> why nodes were left out
        self.eval_metrics: dict[int, list[dict[str, float]]] = {}  # round -> devices' own held-out metrics
        self._task = None

    # ---- plain delegation (abstract methods of Grid) ----
    def set_run(self, run):  # noqa: ANN001, ANN201
        return self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # ---- the watched round ----
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        is_train = messages[0].metadata.message_type == MessageType.TRAIN
        if is_train:
            self.train_rounds += 1
        number = self.round_offset + self.train_rounds
        kind = "train" if is_train else "evaluate"
        ids = [i for i in self.push_messages(messages) if i]
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        pending, replies = set(ids), []
        losses: list[float] = []
        self._start(f"{self.label} {number} {kind}", len(ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                loss = self._reply_loss(reply)
                if loss is not None:
                    losses.append(loss)
                self._advance(losses)
            if pending:
                time.sleep(_POLL_S)
        failures = [f"node {dst.get(m, m)} timed out after {timeout:.0f} s" for m in pending]
        for reply in replies:
            if reply.has_error():
                failures.append(f"node {reply.metadata.src_node_id} failed: {reply.error.reason.splitlines()[0][:200]}")
        for failure in failures:
            log(WARNING, "%s %d %s: %s; it is left out of this round", self.label, number, kind, failure)
        good = [dict(r.content[METRICS]) for r in replies if not r.has_error() and METRICS in r.content]
        if is_train:
            self.failures[number] = failures
            self.client_metrics[number] = good
        else:
            self.eval_metrics[number] = [m for m in good if "eval-loss" in m]
        self._stop()
        log(INFO, "%s %d %s: %d/%d replies", self.label, number, kind, len(replies), len(ids))
        return replies

    @staticmethod
    def _reply_loss(reply: Message) -> float | None:
        if reply.has_error() or METRICS not in reply.content:
            return None
        value = reply.content[METRICS].get("train-loss", reply.content[METRICS].get("eval-loss"))
        return float(value) if isinstance(value, (int, float)) else None

    def _start(self, description: str, total: int) -> None:
        if self.progress is not None:
            self._task = self.progress.add_task(description, total=total, loss="-")

    def _advance(self, losses: list[float]) -> None:
        if self.progress is not None and self._task is not None:
            loss = f"{sum(losses) / len(losses):.3f}" if losses else "-"
            self.progress.update(self._task, advance=1, loss=loss)

    def _stop(self) -> None:
        self._task = None  # the finished round's bar stays on screen
