"""The device-server collaboration protocol (paper §IV-A, Fig. 10): route, fan out, synthesize, broadcast.

:meth:`Collaboration.run` on a query:

1. **route** — :class:`aiflow_fl.collab.router.Router` scores every specialist's description; the
   selected ones (top-k above the threshold) answer. No match: the general (server) member answers
   alone and the response says so (:attr:`CollabResult.note`).
2. **fan out** — the selected specialists answer the query *in parallel* (one thread per agent; each
   agent may be its own process or server). An agent that raises or does not answer within
   ``timeout_s`` is dropped with a warning; if none is left the general member answers.
3. **synthesize** — ``synthesis="prompt"``: the server member writes one answer from the specialists'
   answers with the Mixture-of-Agents aggregator prompt; ``"fusion"``: the familial variant, greedy
   decoding of the router-weighted mixture of the specialists' next-token distributions
   (:func:`aiflow_fl.collab.fusion.fused_greedy`, members share a tokenizer).
4. **broadcast and revise** — the synthesis goes back to the specialists, each revises its answer
   with it as context (in parallel); with ``rounds`` > 1 the server synthesizes again from the
   revisions and broadcasts again. The response is the last synthesis; the revisions are each
   device's final answer.

Every step records its wall time, every agent its own compute time and the bytes on its link
(server→device and device→server). Nothing here knows about HTTP, files or how a member was loaded.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from aiflow_fl.collab.agents import Agent, AgentReply, chat_prompt_ids, reply_bytes, request_bytes
from aiflow_fl.collab.fusion import fused_greedy
from aiflow_fl.collab.prompts import aggregator_messages, revision_messages
from aiflow_fl.collab.router import Router, RoutingDecision
from aiflow_fl.errors import AiflowError

SYNTHESES = ("prompt", "fusion")
SERVER_TO_DEVICE, DEVICE_TO_SERVER = "server->device", "device->server"


@dataclass
class CollabSettings:
    """Knobs of one collaboration (config section ``collab``)."""

    top_k: int = 2
    threshold: float = 0.5
    rounds: int = 1  # broadcast + revise rounds (0: no broadcast)
    timeout_s: float = 120.0  # an agent silent this long in a step is dropped
    max_new_tokens: int = 96
    max_query_chars: int = 4000
    synthesis: str = "prompt"  # prompt (MoA aggregator) | fusion (token-level, router-weighted)


def check_query(query: str, max_chars: int) -> str:
    """The query, stripped; an :class:`AiflowError` when it is empty or longer than ``max_chars``."""
    if not isinstance(query, str) or not query.strip():
        raise AiflowError("The query is empty: give the question to answer, e.g. aiflow collaborate \"What does yield do?\".")
    text = query.strip()
    if len(text) > max_chars:
        raise AiflowError(f"The query has {len(text)} characters, more than collab.max_query_chars={max_chars}; "
                          "shorten it or raise collab.max_query_chars.")
    return text


def check_settings(settings: CollabSettings) -> None:
    if settings.synthesis not in SYNTHESES:
        raise AiflowError(f"collab.synthesis is '{settings.synthesis}', which is not one of: {', '.join(SYNTHESES)}.")
    if settings.rounds < 0:
        raise AiflowError(f"collab.rounds is {settings.rounds}; it must be >= 0 (0: no broadcast and revision).")
    if settings.timeout_s <= 0:
        raise AiflowError(f"collab.timeout_s is {settings.timeout_s}; it must be > 0 seconds.")
    if settings.max_new_tokens < 1:
        raise AiflowError(f"collab.max_new_tokens is {settings.max_new_tokens}; it must be >= 1.")
    if settings.max_query_chars < 1:
        raise AiflowError(f"collab.max_query_chars is {settings.max_query_chars}; it must be >= 1.")


@dataclass
class Step:
    """One step of the protocol: its wall time and the replies (or the synthesis) it produced."""

    name: str
    wall_s: float
    replies: dict[str, AgentReply] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # agent -> why it was dropped

    @property
    def sum_agent_s(self) -> float:
        return sum(r.seconds for r in self.replies.values())


@dataclass
class CollabResult:
    """Everything a caller shows: routing, answers, syntheses, revisions, timings, bytes per link."""

    query: str
    routing: RoutingDecision
    answer: str
    note: str
    steps: list[Step]
    warnings: list[str]
    bytes: dict[str, int]
    wall_s: float

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def answered_by(self) -> list[str]:
        fan = self.step("fan-out")
        return sorted(fan.replies) if fan else []

    def to_dict(self) -> dict:
        return {
            "query": self.query, "answer": self.answer, "note": self.note,
            "routing": {"scores": self.routing.scores, "selected": self.routing.selected, "weights": self.routing.weights,
                        "threshold": self.routing.threshold},
            "steps": [{"name": s.name, "wall_s": s.wall_s, "dropped": s.dropped,
                       "replies": {n: {"text": r.text, "seconds": r.seconds, "new_tokens": r.new_tokens,
                                       "bytes_up": r.bytes_up, "bytes_down": r.bytes_down} for n, r in s.replies.items()}}
                      for s in self.steps],
            "warnings": self.warnings, "bytes": self.bytes, "wall_s": self.wall_s,
        }


def parallel_calls(calls: dict[str, Callable[[], AgentReply]], timeout_s: float, pool: ThreadPoolExecutor) -> tuple[dict[str, AgentReply], dict[str, str]]:
    """Run every call at once; (replies, dropped) — a call that raises or exceeds ``timeout_s`` is dropped.

    The deadline is shared: the step waits at most ``timeout_s`` in total, not per agent."""
    futures = {pool.submit(fn): name for name, fn in calls.items()}
    done, pending = wait(futures, timeout=timeout_s)
    replies: dict[str, AgentReply] = {}
    dropped: dict[str, str] = {}
    for future in done:
        name = futures[future]
        try:
            replies[name] = future.result()
        except Exception as exc:  # a failing specialist must not take the answer down
            dropped[name] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
    for future in pending:
        future.cancel()
        dropped[futures[future]] = f"timed out after {timeout_s:g} s"
    return {n: replies[n] for n in calls if n in replies}, dropped


class Collaboration:
    """The protocol over a router, the specialists (device agents) and the general (server) agent."""

    def __init__(self, router: Router, specialists: dict[str, Agent], general: Agent, settings: CollabSettings | None = None,
                 tokenizer=None) -> None:
        self.settings = settings or CollabSettings()
        check_settings(self.settings)
        missing = [r.name for r in router.routes if r.name not in specialists]
        if missing:
            raise AiflowError(f"The router knows specialists without an agent: {missing}.")
        if self.settings.synthesis == "fusion" and tokenizer is None:
            raise AiflowError("collab.synthesis=fusion needs the family's tokenizer (to build the prompt and decode).")
        self.router = router
        self.specialists = specialists
        self.general = general
        self.tokenizer = tokenizer
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(specialists) + 1), thread_name_prefix="aiflow-collab")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the protocol
    def run(self, query: str, top_k: int | None = None, max_new_tokens: int | None = None) -> CollabResult:
        """One collaboration; ``top_k`` and ``max_new_tokens`` override the settings for this query only."""
        s = self.settings if max_new_tokens is None else dataclasses.replace(self.settings, max_new_tokens=max_new_tokens)
        check_settings(s)
        query = check_query(query, s.max_query_chars)
        start = time.perf_counter()
        steps: list[Step] = []
        notes: list[str] = []
        t0 = time.perf_counter()
        decision = self.router.route(query, top_k)
        steps.append(Step("route", time.perf_counter() - t0))
        user = [{"role": "user", "content": query}]
        if not decision.matched:
            return self._general_only(query, decision, steps, notes, start, decision.explain(), s)

        t0 = time.perf_counter()
        calls = {name: (lambda a=self.specialists[name]: a.chat(user, s.max_new_tokens)) for name in decision.selected}
        replies, dropped = parallel_calls(calls, s.timeout_s, self.pool)
        steps.append(Step("fan-out", time.perf_counter() - t0, replies, dropped))
        notes += self._warn(dropped, "fan-out")
        if not replies:
            return self._general_only(query, decision, steps, notes, start,
                                      "every selected specialist failed or timed out; answered by the general member", s)

        answers = dict((n, r.text) for n, r in replies.items())
        synthesis = self._synthesize(query, answers, decision, steps, "synthesis", s)
        for r in range(1, s.rounds + 1):
            t0 = time.perf_counter()
            calls = {n: (lambda a=self.specialists[n], own=answers[n]: a.chat(revision_messages(query, own, synthesis), s.max_new_tokens))
                     for n in answers}
            revised, dropped = parallel_calls(calls, s.timeout_s, self.pool)
            steps.append(Step(f"revision-{r}", time.perf_counter() - t0, revised, dropped))
            notes += self._warn(dropped, f"revision {r}")
            answers.update({n: rep.text for n, rep in revised.items()})
            if r < s.rounds and revised:
                synthesis = self._synthesize(query, {n: answers[n] for n in revised}, decision, steps, f"synthesis-{r + 1}", s)
        gone = sorted({name for st in steps for name in st.dropped})
        note = decision.explain() + (f"; dropped: {', '.join(gone)}" if gone else "")
        return CollabResult(query, decision, synthesis, note, steps, notes, self._bytes(steps), time.perf_counter() - start)

    # ------------------------------------------------------------------ pieces
    def _synthesize(self, query: str, answers: dict[str, str], decision: RoutingDecision, steps: list[Step], name: str,
                    s: CollabSettings) -> str:
        t0 = time.perf_counter()
        if s.synthesis == "fusion":
            reply = self._fuse(query, list(answers), decision, s.max_new_tokens)
        else:
            reply = self.general.chat(aggregator_messages(query, list(answers.items())), s.max_new_tokens)
        steps.append(Step(name, time.perf_counter() - t0, {reply.agent: reply}))
        return reply.text

    def _fuse(self, query: str, names: list[str], decision: RoutingDecision, max_new_tokens: int) -> AgentReply:
        """Token-level fusion of the answering specialists, weighted by their router weights."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": query}]
        prompt = chat_prompt_ids(tok, messages)
        weights = [decision.weights.get(n, 0.0) for n in names]
        if sum(weights) <= 0:
            weights = [1.0] * len(names)
        agents = [self.specialists[n] for n in names]

        def parallel(thunks):
            return [f.result() for f in [self.pool.submit(t) for t in thunks]]

        t0 = time.perf_counter()
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        ids = fused_greedy(agents, weights, prompt, max_new_tokens, eos, parallel)
        text = tok.decode(ids, skip_special_tokens=True).strip()
        # On the wire: per step, each member's next-token distribution (top-20 log-probs, as the
        # OpenAI logprobs field carries them: ~20 × (id, value) ≈ 20 × 24 bytes of JSON).
        per_step = 20 * 24
        seconds = time.perf_counter() - t0
        return AgentReply("fusion(" + ",".join(names) + ")", text, seconds, len(ids),
                          request_bytes("fusion", messages, max_new_tokens) * len(agents),
                          per_step * len(ids) * len(agents))

    def _general_only(self, query: str, decision: RoutingDecision, steps: list[Step], notes: list[str], start: float, note: str,
                      s: CollabSettings) -> CollabResult:
        t0 = time.perf_counter()
        reply = self.general.chat([{"role": "user", "content": query}], s.max_new_tokens)
        steps.append(Step("general", time.perf_counter() - t0, {reply.agent: reply}))
        return CollabResult(query, decision, reply.text, note, steps, notes, self._bytes(steps), time.perf_counter() - start)

    @staticmethod
    def _warn(dropped: dict[str, str], where: str) -> list[str]:
        out = []
        for name, why in dropped.items():
            message = f"specialist {name} dropped in {where}: {why}"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            out.append(message)
        return out

    def _bytes(self, steps: list[Step]) -> dict[str, int]:
        """Bytes per link: requests server→device, replies device→server (the server's own member is local)."""
        out = {SERVER_TO_DEVICE: 0, DEVICE_TO_SERVER: 0}
        for step in steps:
            for name, reply in step.replies.items():
                if step.name.startswith("synthesis") and not name.startswith("fusion") or step.name == "general":
                    continue  # the server member runs on the server: no link
                out[SERVER_TO_DEVICE] += reply.bytes_up
                out[DEVICE_TO_SERVER] += reply.bytes_down
        return out


__all__ = ["CollabResult", "CollabSettings", "Collaboration", "Step", "check_query", "check_settings",
           "parallel_calls", "reply_bytes", "request_bytes"]
