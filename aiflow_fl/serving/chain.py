"""Hierarchical speculative decoding over a chain of 2 or 3 tiers (AI Flow paper §II-B2, Fig. 6-7).

The device (tier 0) drafts tokens; tier 1 (edge) verifies the device's draft; tier 2 (cloud)
verifies the prefix the edge approved. One token sequence ``seq`` is shared; each tier keeps

* ``done``: how many positions it has run (its KV cache length; cropped on a rejection),
* ``approved``: the prefix of ``seq`` it agrees with (``approved`` never grows above the tier
  below's), and its predictions (argmax or probabilities) at the positions it ran.

A tier runs every position whose input is ready: token ids of the prefix the tier below approved,
or — with familial reuse — the hidden states the tier below produced at its exit layer (so the
shared layers are never recomputed; the lower tier's KV cache serves them). It then checks the
approved-below tokens with :mod:`acceptance` rules. A rejection at position j puts the verifier's
token at j and crops every tier to j. Output = the prefix approved by the last tier, which is
exactly (greedy) or in distribution (sampling) what the last tier would generate on its own.

*Pipelined* mode (paper Fig. 7; PipeSpec, PEARL): a verifier's forward runs in a worker thread (or a
remote server) while the device keeps drafting on top of the unverified block; a rejection rolls
the device back. Sequential mode runs the very same loop with the forward inline.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.serving.acceptance import best_draft_len, greedy_accept, next_draft_len, speculative_accept, verify_costs
from aiflow_fl.serving.link import Link, tensor_bytes
from aiflow_fl.serving.tiers import TierOutput

# Cost-aware chains (Chain._mode_policy): the first probe of drafting, and the next after one that lost,
# wait until the time probes lose is at most this share of the decoding time (at most MAX_PROBE_GAP windows).
PROBE_BUDGET = 0.02
MAX_PROBE_GAP = 256


class TierUnavailable(RuntimeError):
    """A (remote) tier did not answer in time or is gone (what follows: ``Chain.on_verifier_loss``)."""


class VerifierLost(AiflowError):
    """A verifier was lost mid-request under ``on_verifier_loss="fail"``: no unverified answer is given."""


class Cancelled(Exception):
    """Raised by an ``on_tokens`` callback to end a generation early (its client left, or a stop string)."""


class Tier(Protocol):
    name: str
    entry: int

    def process(self, start: int, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                temperature: float = 0.0, want_hidden: bool = True) -> TierOutput: ...

    def reset(self) -> None: ...


@dataclass
class Slot:
    """Runner-side state of one tier (module docstring)."""

    tier: Tier
    link: Link | None  # from the tier below (None for the device)
    block: int = 1  # verify once this many approved-below tokens wait (tiers ≥ 1)
    done: int = 0
    approved: int = 0
    preds: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> argmax id / probs
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> exit hidden state
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> final-norm feature (a draft head's input)
    accepted: int = 0  # draft tokens accepted
    drafted: int = 0  # draft tokens checked
    calls: int = 0  # verification forwards
    produced: int = 0  # tokens approved per call (accepted + correction/bonus)
    busy_s: float = 0.0  # time inside this tier's forwards
    job_s: list[float] = field(default_factory=list)  # wall time of each verification forward
    job_len: list[int] = field(default_factory=list)  # positions of each forward (for the cost model)
    last_accepted: int = 0
    last_drafted: int = 0

    @property
    def via_hidden(self) -> bool:
        return self.tier.entry > 0


@dataclass
class Job:
    """One forward of tier ``g`` over positions ``[start, stop)`` (inputs copied at submit time)."""

    g: int
    start: int
    stop: int
    tokens: torch.Tensor | None
    hidden: torch.Tensor | None


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (prompt excluded)
    seconds: float
    stats: dict


class Chain:
    """A device drafter and 1-2 verifiers (module docstring)."""

    def __init__(
        self,
        tiers: list[Tier],
        links: list[Link] | None = None,
        draft_len: int = 4,
        adaptive: bool = False,
        min_draft: int = 1,
        max_draft: int = 16,
        blocks: list[int] | None = None,
        temperature: float = 0.0,
        eos_token_ids: list[int] | None = None,
        pipelined: bool = False,
        seed: int = 0,
        cores: list[int] | None = None,
        confidence: float = 0.0,
        cost_aware: bool = False,
        probe_every: int = 16,
        on_verifier_loss: str = "fail",
        probe_budget: float = PROBE_BUDGET,
    ) -> None:
        if not 1 <= len(tiers) <= 3:
            raise AiflowError(f"A chain has 1 to 3 tiers (device[, edge[, cloud]]); got {len(tiers)}.")
        if not 1 <= min_draft <= draft_len <= max_draft:
            raise AiflowError(f"Draft lengths must satisfy 1 ≤ min ({min_draft}) ≤ draft_len ({draft_len}) ≤ max ({max_draft}).")
        links = links or [Link(f"{a.name}->{b.name}") for a, b in zip(tiers, tiers[1:])]
        blocks = blocks or [1] * (len(tiers) - 1)
        self.slots = [Slot(tiers[0], None)] + [Slot(t, l, b) for t, l, b in zip(tiers[1:], links, blocks)]
        # A feature-level draft head (serving.draft_head, EAGLE) drafts from tier 1's last hidden states:
        # tier 1 must run from token ids and send its features back with each verdict.
        self.feature_draft = bool(getattr(tiers[0], "reads_features", False))
        if self.feature_draft and (len(tiers) != 2 or self.slots[1].via_hidden):
            raise AiflowError("A feature-level draft head drafts for the verifier whose features it reads: use it in a "
                              "2-tier chain whose verifier runs from token ids (device -> that verifier).")
        self._inexact: set[int] = set()  # device positions run from its own predicted feature (recomputed once known)
        self._feeding = False  # tier 1 runs positions only to give the draft head its first features
        if cost_aware and pipelined:
            raise AiflowError("serving.cost_aware chooses draft lengths for sequential chains; the pipelined mode "
                              "matches the draft block to the verifier's time instead (set one of them to false).")
        if probe_every < 1:
            raise AiflowError(f"probe_every must be ≥ 1 token (got {probe_every}).")
        if not 0 < probe_budget <= 1:
            raise AiflowError(f"probe_budget is the share of decoding time probes may lose: 0 < it ≤ 1 (got {probe_budget}).")
        self.draft_len, self.adaptive, self.min_draft, self.max_draft = draft_len, adaptive, min_draft, max_draft
        self.initial_draft_len = draft_len
        # Cost-aware chains (_mode_policy): measured speed of the last tier alone (mode 0) and of drafting
        # (mode 1) as decayed (tokens, seconds); the preferred mode, windows since the last probe, the gap.
        # All of it outlives generate() calls: the costs are this machine's, not one prompt's.
        self.mode_rates: list[list[float]] = [[0.0, 0.0], [0.0, 0.0]]
        self.window_tokens = self.windows = 0
        self.window_s, self.window_mode = 0.0, 0
        self.cost_aware, self.probe_every, self.probe_budget = cost_aware, probe_every, probe_budget
        # Start with the last tier alone (it never loses); the first probe of drafting waits until a probe
        # cut short as lost (after probe_len tokens' time of the last tier alone) costs ≤ probe_budget.
        self.preferred_mode = 0
        self.probe_gap = max(1, math.ceil(self._probe_len() / (probe_budget * probe_every)))
        self.mode = 0  # the mode running now (a probe of the other one goes on into the next generate())
        self.predicted: tuple[float, float] | None = None  # 2 tiers: modelled tokens/s drafting, alone (_cost_aware)
        # While drafting, the draft length (acceptance.best_draft_len) from a running acceptance estimate
        # (exponentially decayed counts of accepted / rejected draft tokens) and this run's costs.
        if on_verifier_loss not in ("fail", "device"):
            raise AiflowError(f"on_verifier_loss is '{on_verifier_loss}'; use 'fail' or 'device'.")
        # fail: a lost verifier ends the generation with VerifierLost; device: the tiers below finish it
        # and ``verified`` turns False (the answer is no longer checked by the last verifier).
        self.on_verifier_loss = on_verifier_loss
        self.verified = True
        self.acceptance_counts = [0.0, 0.0]  # decayed (accepted, rejected) draft tokens
        self.policy_log: list[int] = []  # draft length chosen after each verification
        self.temperature = temperature
        self.eos = set(eos_token_ids or [])
        self.pipelined = pipelined
        self.confidence = confidence
        self.unsure = False
        self._last_confidence = 1.0
        self.cores = cores
        self.generator = torch.Generator().manual_seed(seed)
        self.seq: list[int] = []
        self.warnings: list[str] = []
        self.stalls = 0  # times drafting was paused with no verification possible (resolved, see generate)

    # ---------------------------------------------------------------- the generation loop
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``input_ids`` (1, T); stream final tokens to ``on_tokens``."""
        self._reset(input_ids.view(-1).tolist())
        prompt_len = emitted = len(self.seq)
        pool = ThreadPoolExecutor(1, initializer=self._pin, initargs=(1,)) if self.pipelined else None
        affinity = os.sched_getaffinity(0) if self.cores and hasattr(os, "sched_getaffinity") else None
        self._pin(0)
        in_flight: tuple[Job, Future] | None = None
        gamma, start_time = self.draft_len, time.perf_counter()
        last_final, last_time = len(self.seq), start_time
        try:
            while not self._finished(prompt_len, max_new_tokens):
                job = None if in_flight else self._next_job(max_new_tokens + prompt_len)
                if job is not None and pool is not None:
                    in_flight = (job, pool.submit(self._run, job))
                elif job is not None:
                    self._finish(job, self._run(job), gamma)
                    gamma = self._adapt(gamma, job)
                elif in_flight is not None and in_flight[1].done():
                    self._finish(in_flight[0], in_flight[1].result(), gamma)
                    gamma, in_flight = self._adapt(gamma, in_flight[0]), None
                elif self._unverified() < gamma * (2 if in_flight else 1) and not self._drafted_eos() and not self.unsure:
                    self._draft_one()  # the device keeps drafting while a verifier works
                elif in_flight is not None:
                    in_flight[1].exception()  # nothing to draft: wait for the verifier
                elif self.slots[0].done < len(self.seq):
                    # Drafting is paused (a doubted or end-of-sequence draft token) and no verifier can
                    # start: one resuming from the device's hidden states needs them at the device's last
                    # draft position first. Run the device there without drafting another token.
                    self.stalls += 1
                    pending = Job(0, self.slots[0].done, len(self.seq), torch.tensor(self.seq[self.slots[0].done:]), None)
                    self._finish(pending, self._run(pending), gamma)
                elif self.unsure:
                    self.stalls += 1
                    self.unsure = False  # nothing left to verify: the gate has nothing to wait for
                else:
                    raise AssertionError("speculative chain made no progress")  # a bug, never a user error
                final = self.slots[-1].approved
                if self._measured_modes():
                    now = time.perf_counter()
                    # credited when tokens are finalised, and after every step of a probe that is behind
                    # already (a 3-tier probe finalises only once the cloud has verified a block)
                    if final != last_final or (last_final > prompt_len and self._probe_behind(now - last_time)):
                        if last_final > prompt_len:  # the first token carries the prompt's forward: no mode's speed
                            self._mode_policy(max(0, final - last_final), now - last_time)
                        last_final, last_time, gamma = final, now, self.draft_len
                if on_tokens and final > emitted:
                    on_tokens(self.seq[emitted:final])
                    emitted = final
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
        new = self.seq[prompt_len:self.slots[-1].approved][:max_new_tokens]
        for i, token in enumerate(new):
            if token in self.eos:
                new = new[: i + 1]
                break
        return GenerationResult(new, time.perf_counter() - start_time, self.stats(len(new), time.perf_counter() - start_time))

    # ---------------------------------------------------------------- steps
    def _next_job(self, limit: int) -> Job | None:
        """The highest tier whose block of approved-below tokens is full (or final), as a job; in solo
        mode (cost-aware draft length 0) tier 1 then runs the new positions itself from token ids."""
        job = self._blocked_job(limit)
        solo = len(self.slots) - 1 if self._solo() else 1 if self._starved() else 0
        if job is None and solo and self.slots[solo].done < len(self.seq) and len(self.seq) < limit:
            self._feeding = not self._solo()
            job = self._job(solo, len(self.seq))
        return job

    def _starved(self) -> bool:
        """A draft head cannot draft the next token: it has neither tier 1's feature of the position
        before the last one nor its own prediction there (the prompt, before tier 1 has run it)."""
        if not self.feature_draft:
            return False
        before = len(self.seq) - 2
        return before >= 0 and before not in self.slots[1].features and self.slots[0].done <= before

    def _solo(self) -> bool:
        """Cost-aware draft length 0: the last tier decodes alone from token ids (lower tiers idle; they
        catch up in one batched forward when drafting is probed again)."""
        return self.cost_aware and self.draft_len == 0 and len(self.slots) > 1 and not self.slots[-1].via_hidden

    def _blocked_job(self, limit: int) -> Job | None:
        for g in range(len(self.slots) - 1, 0, -1):
            slot, low = self.slots[g], self.slots[g - 1]
            waiting = low.approved - slot.approved
            flush = low.approved >= limit or any(t in self.eos for t in self.seq[slot.approved:low.approved]) or (g == 1 and self.unsure)
            ready = min(low.approved, low.done) if slot.via_hidden else low.approved
            if waiting > 0 and ready > slot.done and (waiting >= self._block(g) or flush):
                return self._job(g, ready)
        return None

    def _block(self, g: int) -> int:
        return self.draft_len if g == 1 and self.slots[g].block <= 1 else self.slots[g].block

    def _job(self, g: int, stop: int) -> Job:
        slot, low = self.slots[g], self.slots[g - 1] if g else None
        start = slot.done
        if slot.via_hidden:
            hidden = torch.stack([low.hidden[p] for p in range(start, stop)])
            return Job(g, start, stop, None, hidden)
        return Job(g, start, stop, torch.tensor(self.seq[start:stop]), None)

    def _run(self, job: Job) -> TierOutput | str:
        """The forward (touches no chain state: safe in a worker thread). A failure comes back as text."""
        slot = self.slots[job.g]
        want_hidden = job.g + 1 < len(self.slots) and self.slots[job.g + 1].via_hidden
        t0 = time.perf_counter()
        try:
            if slot.link is not None:  # up: hidden states (familial reuse) or token ids
                sent = job.hidden if job.hidden is not None else job.tokens
                slot.link.send(sent.numel() * 4, up=True)
            extra = {"want_features": True} if self.feature_draft and job.g == 1 else {}
            out = slot.tier.process(job.start, tokens=job.tokens, hidden=job.hidden,
                                    temperature=self.temperature, want_hidden=want_hidden, **extra)
            if slot.link is not None:  # down: predictions (int32 ids or float32 probabilities) [+ hidden] [+ features]
                down = out.preds.numel() * 4 + (out.hidden.numel() * 4 if out.hidden is not None and want_hidden else 0)
                slot.link.send(down + (out.features.numel() * 4 if out.features is not None else 0), up=False)
        except TierUnavailable as exc:
            return str(exc)
        finally:
            slot.busy_s += time.perf_counter() - t0
            slot.job_s.append(time.perf_counter() - t0)
            slot.job_len.append(job.stop - job.start)
        return out

    def _finish(self, job: Job, out: TierOutput | str, gamma: int) -> None:
        """Store a forward's results, then let the tier check what the tier below approved."""
        if isinstance(out, str):
            if job.g == 0:
                raise AiflowError(f"The device tier failed: {out}")
            self._drop(job.g, out)
            return
        slot = self.slots[job.g]
        slot.done = job.stop
        for i in range(job.stop - job.start):
            slot.preds[job.start + i] = out.preds[i]
            if out.hidden is not None:
                slot.hidden[job.start + i] = out.hidden[i]
            if out.features is not None:
                slot.features[job.start + i] = out.features[i]
        if job.g == 0 and out.confidence is not None:
            self._last_confidence = float(out.confidence[-1])
        if job.g > 0:
            slot.calls += 1
            self.unsure = False if job.g == 1 else self.unsure
            self._check(job.g)
            self._prune()

    def _prune(self) -> None:
        """Forget what no tier can need again: predictions before the lowest approved prefix, and exit
        hidden states the next tier has already consumed (a rollback recomputes from its position)."""
        floor = min(s.approved for s in self.slots) - 1
        # a draft head may still recompute from its first inexact position (needs the feature before it)
        needed = min([floor, self.slots[0].done, *self._inexact]) - 1
        for i, slot in enumerate(self.slots):
            consumed = self.slots[i + 1].done if i + 1 < len(self.slots) else slot.done + 1
            for store, below in ((slot.preds, floor), (slot.hidden, consumed), (slot.features, needed)):
                for p in [p for p in store if p < below]:
                    del store[p]

    def _check(self, g: int) -> None:
        """Tier g verifies the tokens the tier below approved, up to what it has predictions for."""
        slot, low, seq = self.slots[g], self.slots[g - 1], self.seq
        lo, hi = slot.approved, min(low.approved, slot.done + 1)
        solo = (self._solo() and g == len(self.slots) - 1) or (self._feeding and g == 1)
        if solo and lo == hi == len(seq) == slot.done:  # solo: the verifier's own token
            self._feeding = False
            seq.append(self._token(slot.preds[len(seq) - 1]))
            slot.produced += 1
            slot.last_accepted = slot.last_drafted = 0
            for s in self.slots[: g + 1]:
                s.approved = len(seq)
            return
        if hi <= lo:
            return
        draft = torch.tensor(seq[lo:hi])
        with_bonus = hi == len(seq) and hi <= slot.done
        rows = range(lo - 1, hi if with_bonus else hi - 1)
        if self.temperature <= 0:
            accepted, token = greedy_accept(draft, torch.stack([slot.preds[p] for p in rows]))
        else:
            q = torch.stack([low.preds[p] for p in range(lo - 1, hi - 1)])
            p = torch.stack([slot.preds[p] for p in rows])
            accepted, token = speculative_accept(draft, q, p, self.generator)
        slot.accepted += accepted
        slot.drafted += len(draft)
        slot.produced += accepted + (token is not None)
        slot.last_accepted, slot.last_drafted = accepted, len(draft)
        if token is None:
            slot.approved = hi
            return
        self._rollback(lo + accepted)
        seq.append(token)
        for s in self.slots[: g + 1]:
            s.approved = len(seq)

    def _draft_one(self) -> None:
        """The device runs its pending positions and appends its next token."""
        device = self.slots[0]
        if self.feature_draft:
            self._run_draft_head()
        elif device.done < len(self.seq):  # else a stall resolution already ran it (generate)
            job = Job(0, device.done, len(self.seq), torch.tensor(self.seq[device.done:], dtype=torch.long), None)
            self._finish(job, self._run(job), 0)
        pred = device.preds[len(self.seq) - 1]
        token = self._token(pred)
        # Confidence-gated drafting (as transformers' assistant_confidence_threshold): stop the block
        # after a token the draft itself doubts; with familial reuse the verifier then simply goes on
        # from the device's layers, so a weak draft costs little more than the verifier alone.
        confidence = float(pred.max()) if self.temperature > 0 else self._last_confidence
        self.unsure = self.confidence > 0 and confidence < self.confidence
        self.seq.append(token)
        device.approved = len(self.seq)

    def _run_draft_head(self) -> None:
        """Bring a feature-level draft head up to the last position (EAGLE's draft step).

        Positions it ran from its own predicted feature whose true feature tier 1 has since computed are
        run again (from the first of them), so the head always autoregresses from the verifier's own
        features where they exist. Positions with a true feature before them run in one forward; the
        rest (the newest draft tokens) one at a time, each from the head's prediction before it.
        """
        device, source = self.slots[0], self.slots[1]
        stale = [p for p in self._inexact if p - 1 in source.features]
        if stale:
            device.done = min(device.done, min(stale))
        end = len(self.seq)
        while device.done < end:
            start = stop = device.done
            while stop < end and (stop == 0 or stop - 1 in source.features):
                stop += 1
            exact = stop > start
            if not exact:  # the feature before ``start`` is the head's own prediction
                stop = start + 1
            zero = torch.zeros(device.tier.hidden_size)  # nothing precedes position 0
            feats = torch.stack([zero if p == 0 else source.features[p - 1] if exact else device.hidden[p - 1]
                                 for p in range(start, stop)])
            job = Job(0, start, stop, torch.tensor(self.seq[start:stop], dtype=torch.long), feats)
            self._finish(job, self._run(job), 0)
            for p in range(start, stop):
                (self._inexact.discard if exact else self._inexact.add)(p)

    def _token(self, pred: torch.Tensor) -> int:
        """The next token from a tier's prediction: its argmax id (greedy) or a sample of its probabilities."""
        return int(pred) if self.temperature <= 0 else int(torch.multinomial(pred, 1, generator=self.generator))

    def _rollback(self, position: int) -> None:
        """Drop token ``position`` and everything after it from the sequence and every tier."""
        del self.seq[position:]
        # The doubted draft token that stopped drafting (confidence gate) was the last one: it is gone.
        # Left set, a rejection by the cloud (which does not reset it, unlike the edge's verification)
        # would leave the device waiting for a verification nobody can start.
        self.unsure = False
        for slot in self.slots:
            slot.done = min(slot.done, position)
            slot.approved = min(slot.approved, position)
            for store in (slot.preds, slot.hidden, slot.features):
                for p in [p for p in store if p >= position]:
                    del store[p]
        self._inexact = {p for p in self._inexact if p < position}

    def _adapt(self, gamma: int, job: Job) -> int:
        """Adaptive draft length after a verification by tier 1.

        Sequential: grow on full acceptance, shrink on rejection. Pipelined: match the draft block to
        the verifier's forward time (median verify time / median device time per token).
        """
        if len(self.slots) < 2:
            return self.draft_len  # every verifier was dropped (_drop): the device drafts on alone
        if self.cost_aware and job.g == 1:
            if gamma == 0:
                return 0  # the last tier alone: when to draft again is the measured policy's call (_mode_policy)
            return self._cost_aware(gamma)
        if not self.adaptive or job.g != 1 or len(self.slots) < 2:
            return gamma
        slot = self.slots[1]
        if self.pipelined and self.slots[0].job_s and slot.job_s:
            per_token = sorted(self.slots[0].job_s)[len(self.slots[0].job_s) // 2]
            verify = sorted(slot.job_s)[len(slot.job_s) // 2]
            gamma = round(verify / max(per_token, 1e-6))
        else:
            gamma = next_draft_len(gamma, slot.last_accepted, slot.last_drafted, self.min_draft, self.max_draft)
        self.draft_len = max(self.min_draft, min(self.max_draft, gamma))
        return self.draft_len

    def acceptance_estimate(self) -> float:
        """Per-token acceptance α from decayed counts, with a uniform prior ((a + 1) / (a + r + 2))."""
        accepted, rejected = self.acceptance_counts
        return (accepted + 1.0) / (accepted + rejected + 2.0)

    def _cost_aware(self, gamma: int) -> int:
        """The draft length after a verification by tier 1 while drafting (acceptance.best_draft_len).

        Costs are this run's medians: the device's time per drafted token and tier 1's forwards by
        length (a line fitted over lengths). From token ids a round of k drafts runs k + 1 positions
        (the pending bonus/correction token first) and yields a bonus token; resuming from the device's
        hidden states it runs k and has none. k ≥ 1 here: whether to draft at all is decided by
        measured speed, not by this model (_mode_policy).
        """
        device, slot = self.slots[0], self.slots[1]
        if slot.last_drafted:
            rejected = float(slot.last_accepted < slot.last_drafted)
            a, r = self.acceptance_counts
            self.acceptance_counts = [0.9 * a + slot.last_accepted, 0.9 * r + rejected]
        drafts = [t for t, n in zip(device.job_s, device.job_len) if n == 1]
        if len(drafts) < 2 or len(slot.job_s) < 2:
            return gamma  # not measured yet
        draft_s = sorted(drafts)[len(drafts) // 2]
        fit = verify_costs(list(zip(slot.job_len, slot.job_s)), self.max_draft + 1)
        bonus = not slot.via_hidden
        verify_s = [0.0] + fit[2:] if bonus else fit[: self.max_draft + 1]
        k, speed = best_draft_len(self.acceptance_estimate(), draft_s, verify_s, fit[1], bonus=bonus, lowest=max(1, self.min_draft))
        self.predicted = (speed, 1.0 / fit[1])  # drafting vs the verifier alone, from medians (robust to load spikes)
        self.draft_len = k
        self.policy_log.append(k)
        return k

    def _measured_modes(self) -> bool:
        """Cost-aware chains whose last tier can decode alone (it reads token ids) choose between the
        last tier alone and drafting by measured speed (_mode_policy)."""
        return self.cost_aware and len(self.slots) > 1 and not self.slots[-1].via_hidden

    def _mode_policy(self, gained: int, elapsed: float) -> None:
        """Cost-aware chains: drafting, or the last tier alone, by measured speed ("defaults never lose").

        Finalised tokens and wall time are credited to the current mode. The chain runs the mode it
        believes faster (at first: the last tier alone, which never loses) for windows of
        ``probe_every`` tokens and, every ``gap`` windows, tries the other one for a quarter window (3 tiers: half,
        and drafting must win by 10 %; 2 tiers: also in the cost model of the probe's forwards); a
        probe that loses at least doubles the gap (enough that probes cost ≤ ``probe_budget`` of the time, up
        to MAX_PROBE_GAP windows; a drafting probe is ended as lost after any step once it is behind), one
        that wins makes its mode the preferred one. So a chain whose drafting does not pay spends a vanishing share of its tokens finding that
        out, and one whose drafting pays switches to it after one probe. The state outlives generate()
        calls (a server or a benchmark pays for the probes once, not per request).
        """
        mode = 0 if self.draft_len == 0 else 1
        if mode != self.window_mode:  # the mode changed (a probe began or ended): a fresh window
            self.window_mode, self.window_tokens, self.window_s = mode, 0, 0.0
        self.window_tokens += gained
        self.window_s += elapsed
        probing = mode != self.preferred_mode
        probe_len = self._probe_len()
        solo_speed = self._mode_speeds()[0]
        alone = 0.0 if solo_speed is None else self.window_s * solo_speed  # tokens the last tier alone made meanwhile
        lost = probing and mode == 1 and alone > probe_len and self.window_tokens < alone
        if self.window_tokens < (probe_len if probing else self.probe_every) and not lost:
            return  # (a drafting probe behind the last tier alone after the time it needs for the whole probe has lost)
        tokens, seconds = self.mode_rates[mode]  # a finished window; older ones count half as much
        self.mode_rates[mode] = [0.5 * tokens + self.window_tokens, 0.5 * seconds + self.window_s]
        window_tokens, window_s = self.window_tokens, self.window_s
        self.window_tokens, self.window_s = 0, 0.0
        speeds = self._mode_speeds()
        if probing:
            faster = not lost and speeds[mode] is not None and speeds[1 - mode] is not None and speeds[mode] > speeds[1 - mode]
            if mode == 1 and len(self.slots) == 2:
                # drafting must also win in the cost model of this probe's forwards (medians): a window's
                # wall time on a loaded machine swings more than the gap between the modes
                faster = faster and self.predicted is not None and self.predicted[0] > self.predicted[1]
            elif mode == 1:  # 3 tiers (no cost model of two verifiers): by a clear margin
                faster = faster and speeds[1] > 1.1 * speeds[0]
            if faster:
                self.preferred_mode, self.probe_gap = mode, 1
            else:
                self.probe_gap = self._gap_after_loss(window_tokens, window_s, speeds[1 - mode])
            nxt = self.preferred_mode
        else:
            self.windows += 1
            nxt = mode
            if self.windows >= self.probe_gap:
                self.windows, nxt = 0, 1 - mode
        self.mode = nxt
        self.draft_len = 0 if nxt == 0 else max(self.min_draft, self.initial_draft_len)
        self.policy_log.append(self.draft_len)

    def _gap_after_loss(self, tokens: int, seconds: float, preferred_speed: float | None) -> int:
        """Windows until the next probe after one that lost: twice the last gap, and at least enough that
        probes cost at most ``probe_budget`` of the time (the time this probe lost over the preferred mode's
        window time); at most MAX_PROBE_GAP windows."""
        gap = 2 * self.probe_gap
        if preferred_speed:
            lost_s = max(0.0, seconds - tokens / preferred_speed)
            window_s = self.probe_every / preferred_speed
            gap = max(gap, math.ceil(lost_s / (self.probe_budget * window_s)))
        return min(MAX_PROBE_GAP, gap)

    def _probe_behind(self, pending_s: float) -> bool:
        """A drafting probe has run as long as the last tier alone needs for the whole probe and has
        finalised fewer tokens than it would have meanwhile (then _mode_policy ends it as lost)."""
        solo_speed = self._mode_speeds()[0]
        if self.mode != 1 or self.preferred_mode != 0 or solo_speed is None:
            return False
        started = self.window_mode == 1  # else the probe has not finalised a token yet: its window is empty
        alone = ((self.window_s if started else 0.0) + pending_s) * solo_speed
        return alone > self._probe_len() and (self.window_tokens if started else 0) < alone

    def _probe_len(self) -> int:
        # a probe: a quarter window (2 tiers), half a window (3 tiers: the cloud finalises tokens in blocks)
        return max(4, self.probe_every // (4 if len(self.slots) == 2 else 2))

    def _mode_speeds(self) -> list[float | None]:
        return [t / s if s > 0 else None for t, s in self.mode_rates]

    def _drop(self, g: int, why: str) -> None:
        """A verifier failed: fail (``on_verifier_loss="fail"``), or drop it and the tiers above and go on
        with what is left, unverified."""
        names = [s.tier.name for s in self.slots[g:]]
        if self.on_verifier_loss == "fail":
            raise VerifierLost(f"tier(s) {', '.join(names)} unavailable ({why}); stopping, since serving.on_verifier_loss=fail "
                               "(set it to 'device' to let the device member finish alone, marked unverified)")
        self.verified = False
        message = (f"tier(s) {', '.join(names)} unavailable ({why}); continuing with "
                   f"{', '.join(s.tier.name for s in self.slots[:g])} only — output is no longer checked by {names[-1]}")
        warnings.warn(message, stacklevel=2)
        self.warnings.append(message)
        del self.slots[g:]
        if self.draft_len == 0 and not self._measured_modes():  # nobody left to decode alone: the device drafts
            self.draft_len = max(self.min_draft, self.initial_draft_len)

    # ---------------------------------------------------------------- helpers
    def _reset(self, prompt: list[int]) -> None:
        """A fresh generation: empty caches and predictions, and per-generation statistics from zero
        (stats() describes one generate() call; a caller summing calls must not count one twice)."""
        self.seq = list(prompt)
        for slot in self.slots:
            slot.tier.reset()
            slot.done, slot.approved = 0, len(prompt)
            slot.preds.clear()
            slot.hidden.clear()
            slot.features.clear()
            slot.job_s.clear()
            slot.job_len.clear()
            slot.accepted = slot.drafted = slot.calls = slot.produced = 0
            slot.last_accepted = slot.last_drafted = 0
            slot.busy_s = 0.0
            if slot.link is not None:
                slot.link.reset_stats()
        self.acceptance_counts, self.policy_log = [0.0, 0.0], []
        self.stalls = 0
        self._inexact, self._feeding = set(), False
        self.predicted = None
        if self._measured_modes():
            # what earlier calls learnt carries over (the costs are the machine's, not the prompt's)
            self.draft_len = 0 if self.mode == 0 else max(self.min_draft, self.initial_draft_len)

    def _finished(self, prompt_len: int, max_new_tokens: int) -> bool:
        final = self.seq[prompt_len:self.slots[-1].approved]
        return len(final) >= max_new_tokens or any(t in self.eos for t in final)

    def _unverified(self) -> int:
        return len(self.seq) - (self.slots[1].approved if len(self.slots) > 1 else len(self.seq))

    def _drafted_eos(self) -> bool:
        start = self.slots[1].approved if len(self.slots) > 1 else len(self.seq)
        return any(t in self.eos for t in self.seq[start:])

    def _pin(self, core_index: int) -> None:
        """Pipelined placement: this thread (device=0, verifier worker=1) on its own core."""
        if self.cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.cores[core_index % len(self.cores)]})

    def stats(self, new_tokens: int = 0, seconds: float = 0.0) -> dict:
        tiers = []
        for slot in self.slots:
            row = {"tier": slot.tier.name, "entry_layer": slot.tier.entry, "busy_s": round(slot.busy_s, 3)}
            if slot.link is not None:
                row.update(accepted=slot.accepted, drafted=slot.drafted, calls=slot.calls, produced=slot.produced,
                           acceptance_rate=round(slot.accepted / max(1, slot.drafted), 3),
                           mean_accepted_len=round(slot.produced / max(1, slot.calls), 3), **slot.link.stats())
            tiers.append(row)
        return {"new_tokens": new_tokens, "seconds": round(seconds, 3),
                "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else 0.0,
                "tiers": tiers, "warnings": list(self.warnings), "stalls_resolved": self.stalls, "verified": self.verified,
                **({"draft_lens_chosen": {str(k): self.policy_log.count(k) for k in sorted(set(self.policy_log))},
                    "acceptance_estimate": round(self.acceptance_estimate(), 3),
                    "preferred": "drafting" if self.preferred_mode else "last tier alone",
                    "measured_tokens_per_s": dict(zip(("last tier alone", "drafting"),
                                                      [None if v is None else round(v, 2) for v in self._mode_speeds()]))}
                 if self.cost_aware else {})}
