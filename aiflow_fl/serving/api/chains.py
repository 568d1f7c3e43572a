"""Chain models (``eesb-0>full``): one hierarchical speculative decoder per request.

Each request gets its own :class:`~aiflow_fl.serving.chain.Chain` over the shared member weights
(its own KV caches; remote verifiers get their own sessions) and runs in a worker thread. Its tokens
go through the request's :class:`~aiflow_fl.serving.api.scheduler.Sequence` (stop strings, limits,
text); a client that leaves or a stop string ends the chain through ``Cancelled``. The final event
carries the per-link acceptance, drafted/accepted tokens and bytes (the response's ``aiflow`` field).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from aiflow_fl.config import ServingConfig
from aiflow_fl.serving.build import verifier_entries
from aiflow_fl.serving.chain import Cancelled, Chain, VerifierLost
from aiflow_fl.serving.link import Link
from aiflow_fl.family.member import Member
from aiflow_fl.serving.tiers import LocalTier, draft_vocabulary
from aiflow_fl.serving.api.metrics import Metrics
from aiflow_fl.serving.api.scheduler import Event, Sequence


@dataclass
class RemoteMember:
    """A chain member served by another ``aiflow serve`` process."""

    name: str
    url: str
    info: dict
    api_key: str | None = None
    ca_file: str | None = None

    @property
    def spec(self) -> dict:
        return next(m for m in self.info["members"] if m["name"] == self.name)

    def as_member(self) -> "RemoteLayers":
        """What the chain needs to know about a remote member's layers (to resume from a lower tier's cache)."""
        spec = self.spec
        return RemoteLayers(self.name, int(spec["exit_layer"]), int(spec["shared_layers"]))


@dataclass(frozen=True)
class RemoteLayers:
    """The layer counts of a remote member (no weights here): what :func:`resume_layer` reads."""

    name: str
    exit_layer: int
    shared_layers: int


class ChainRunner:
    """Runs the requests of one chain model in a shared worker pool."""

    def __init__(self, name: str, members: list[Member | RemoteMember], serving: ServingConfig, eos: list[int],
                 pool: ThreadPoolExecutor, metrics: Metrics) -> None:
        self.name, self.members, self.serving, self.eos = name, members, serving, eos
        self.pool, self.metrics = pool, metrics
        device = members[0]
        assert isinstance(device, Member), "the drafting member runs in this process"
        self.vocab = draft_vocabulary(device.model.config.vocab_size, serving.draft_vocab, eos)

    def chain(self, temperature: float, seed: int | None) -> Chain:
        from aiflow_fl.serving.server import RemoteTier

        s = self.serving
        device = self.members[0]
        tiers: list = [LocalTier(device, 0, self.vocab, draft=True)]
        spans = [device] + [m.as_member() if isinstance(m, RemoteMember) else m for m in self.members[1:]]
        for m, entry in zip(self.members[1:], verifier_entries(spans, s.reuse, s.cost_aware)):
            if isinstance(m, RemoteMember):
                tiers.append(RemoteTier(m.url, entry=entry, timeout_s=s.timeout_s, member=m.name, api_key=m.api_key,
                                        ca_file=m.ca_file, info=m.info))
            else:
                tiers.append(LocalTier(m, entry))
        # simulated links (serving.edge_link for the first hop, cloud_link for the second) on top of the real one
        configs = [s.edge_link, s.cloud_link]
        links = [Link(f"{a.name}->{b.name}", c.latency_ms, c.bandwidth_mbps, c.jitter_ms, s.seed + i)
                 for i, (a, b, c) in enumerate(zip(tiers, tiers[1:], configs))]
        blocks = [1] + ([s.cloud_block] if len(tiers) == 3 else [])
        seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return Chain(tiers, links=links, draft_len=s.draft_len, adaptive=s.adaptive, min_draft=s.min_draft_len,
                     max_draft=max(s.max_draft_len, s.draft_len), blocks=blocks, temperature=temperature,
                     eos_token_ids=self.eos, seed=seed, confidence=s.draft_confidence, cost_aware=s.cost_aware,
                     probe_every=s.probe_every, probe_budget=s.probe_budget, on_verifier_loss=s.on_verifier_loss)

    def submit(self, seq: Sequence) -> None:
        self.pool.submit(self._run, seq)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled.set()

    def _run(self, seq: Sequence) -> None:
        final: list[Event] = []
        emit = seq.emit

        def hold_final(event: Event) -> None:  # the last event waits for the chain's statistics
            (final.append if event.final else emit)(event)

        seq.emit = hold_final

        def on_tokens(tokens: list[int]) -> None:
            for token in tokens:
                if seq.done:
                    break
                seq.record(token)
            if seq.done:
                raise Cancelled

        chain = None
        try:
            if seq.cancelled.is_set():
                return
            chain = self.chain(seq.temperature, seq.seed)
            with torch.inference_mode():
                try:
                    chain.generate(torch.tensor([seq.prompt]), seq.max_new_tokens, on_tokens=on_tokens)
                except Cancelled:
                    pass
            if not seq.done:  # the chain ended without its last token reaching the sequence (cannot happen)
                seq.finish_reason = "length"
                final.append(Event(text=seq.stream.finish(), finish_reason="length"))
            if seq.cancelled.is_set() and not final:
                return
            extra = self.report(chain)
            if not extra["verified"]:
                self.metrics.verifier_lost.labels(self.name, "device").inc()
            for event in final:
                event.extra = extra
                emit(event)
        except VerifierLost as exc:
            self.metrics.verifier_lost.labels(self.name, "fail").inc()
            emit(Event(error=(502, str(exc))))
        except Exception as exc:  # a bug must not take the server down; the request gets a 500
            emit(Event(error=(500, f"{self.name}: generation failed ({type(exc).__name__}: {exc})")))
        finally:
            for slot in (chain.slots if chain is not None else []):
                if hasattr(slot.tier, "close"):
                    slot.tier.close()

    def report(self, chain: Chain) -> dict:
        """Per-link acceptance, drafted/accepted tokens and bytes (also added to the metrics)."""
        links = []
        for slot in chain.slots[1:]:
            row = {"link": slot.link.name, "verifier": slot.tier.name, "drafts": slot.calls, "drafted": slot.drafted,
                   "accepted": slot.accepted, "acceptance_rate": round(slot.accepted / max(1, slot.drafted), 4),
                   "mean_acceptance_length": round(1 + slot.accepted / max(1, slot.calls), 3),
                   "bytes_up": slot.link.bytes_up, "bytes_down": slot.link.bytes_down}
            if hasattr(slot.tier, "bytes_sent"):  # a remote tier: the real bytes on the wire, and re-sent prefixes
                row.update(wire_bytes_sent=slot.tier.bytes_sent, wire_bytes_received=slot.tier.bytes_received,
                           prefix_resends=slot.tier.resends)
            links.append(row)
            self.metrics.num_drafts.labels(self.name, slot.link.name).inc(slot.calls)
            self.metrics.num_draft_tokens.labels(self.name, slot.link.name).inc(slot.drafted)
            self.metrics.num_accepted_tokens.labels(self.name, slot.link.name).inc(slot.accepted)
        return {"chain": self.name, "verified": chain.verified, "tiers": [s.tier.name for s in chain.slots],
                "links": links, "warnings": list(chain.warnings)}
