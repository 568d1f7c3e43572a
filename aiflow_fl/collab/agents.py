"""The transport seam of the protocol: what the orchestrator asks of an agent, and two ways to reach one.

:class:`Agent` is the interface (a ``typing.Protocol``): ``chat`` (a text answer to chat messages),
``begin``/``advance`` (next-token log-probabilities for token-level fusion) and ``score`` (log-probabilities
of given continuations, for evaluation without a judge). The protocol logic (``protocol.py``) only
talks to this interface, so the transport is swappable:

* :class:`LocalAgent` — a family member (``model`` + ``tokenizer``) in this process;
* :class:`ProcessAgent` — the same agent in its own worker process (``multiprocessing``, spawn), one
  request at a time over a pipe; what the serving API's HTTP client will replace.

Every reply carries the agent's own compute time and the bytes that crossed the link each way. For a
local agent these are the sizes of the OpenAI-style JSON bodies that would carry the request and the
reply (``chat.completions``: ``{"model", "messages", "max_tokens"}`` / ``{"choices": [{"message"}],
"usage"}``), so an in-process run reports the same byte figures a served one would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from aiflow_fl.generation import chat_template_ids


@dataclass
class AgentReply:
    """An agent's answer with its own compute time and the bytes each way on its link."""

    agent: str
    text: str
    seconds: float
    new_tokens: int
    bytes_up: int  # server -> agent (the request)
    bytes_down: int  # agent -> server (the reply)


def request_bytes(model: str, messages: list[dict[str, str]], max_new_tokens: int) -> int:
    """Size of the chat-completions request body that carries ``messages``."""
    return len(json.dumps({"model": model, "messages": messages, "max_tokens": max_new_tokens}).encode())


def reply_bytes(model: str, text: str, prompt_tokens: int, new_tokens: int) -> int:
    """Size of the chat-completions reply body that carries ``text``."""
    body = {"object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens}}
    return len(json.dumps(body).encode())


class Agent(Protocol):
    """What the collaboration protocol needs from a device or server member (see the module docstring)."""

    name: str

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> AgentReply: ...

    def begin(self, token_ids: list[int]) -> torch.Tensor: ...

    def advance(self, token_id: int) -> torch.Tensor: ...

    def score(self, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]: ...


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], system_prompt: str | None = None) -> list[int]:
    """Chat-template token ids of ``messages`` with the generation prompt (plain text without a template)."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        return chat_template_ids(tokenizer, messages)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, add_special_tokens=False).input_ids


class LocalAgent:
    """A causal LM and its tokenizer in this process, answering greedily (deterministic answers)."""

    def __init__(self, name: str, model, tokenizer, system_prompt: str | None = None) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._lock = threading.Lock()  # one request at a time per member (its KV stream is stateful)
        self._past = None

    # -------------------------------------------------------------------- text answers
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.system_prompt)

    @torch.inference_mode()
    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> AgentReply:
        with self._lock:
            start = time.perf_counter()
            ids = torch.tensor([self.prompt_ids(messages)])
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad)
            new = out[0, ids.shape[1]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            seconds = time.perf_counter() - start
        return AgentReply(self.name, text, seconds, int(new.numel()), request_bytes(self.name, messages, max_new_tokens),
                          reply_bytes(self.name, text, ids.shape[1], int(new.numel())))

    # -------------------------------------------------------------------- token-level fusion
    @torch.inference_mode()
    def begin(self, token_ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([token_ids]), use_cache=True)
        self._past = out.cache
        return torch.log_softmax(out.logits[0, -1].float(), -1)

    @torch.inference_mode()
    def advance(self, token_id: int) -> torch.Tensor:
        if self._past is None:
            raise RuntimeError(f"agent {self.name}: advance() before begin()")
        out = self.model(input_ids=torch.tensor([[token_id]]), cache=self._past, use_cache=True)
        self._past = out.cache
        return torch.log_softmax(out.logits[0, -1].float(), -1)

    # -------------------------------------------------------------------- scoring (evaluation)
    @torch.inference_mode()
    def score(self, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """log p(c_t | context, c_<t) for every token of every continuation (the context is run once)."""
        return score_continuations(self.model, context_ids, continuations)


@torch.inference_mode()
def score_continuations(model, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation after a shared context.

    The context goes through the model once; its KV cache is repeated for the batch of continuations
    (right-padded; padded positions are masked and not returned)."""
    if not context_ids:
        raise ValueError("score_continuations needs a non-empty context")
    n = len(continuations)
    if n == 0:
        return []
    ctx = model(input_ids=torch.tensor([context_ids]), use_cache=True, logits_to_keep=1)  # only the last position's head
    first = torch.log_softmax(ctx.logits[0, -1].float(), -1)  # predicts each continuation's first token
    lengths = [len(c) for c in continuations]
    width = max(lengths)
    out: list[torch.Tensor] = []
    if width > 1:
        past = ctx.cache
        past.batch_repeat_interleave(n)
        batch = torch.zeros(n, width - 1, dtype=torch.long)
        mask = torch.zeros(n, len(context_ids) + width - 1, dtype=torch.long)
        mask[:, :len(context_ids)] = 1
        for i, cont in enumerate(continuations):
            if len(cont) > 1:
                batch[i, :len(cont) - 1] = torch.tensor(cont[:-1])
                mask[i, len(context_ids):len(context_ids) + len(cont) - 1] = 1
        logits = model(input_ids=batch, cache=past, attention_mask=mask, use_cache=False).logits.float()
        rest = torch.log_softmax(logits, -1)
    for i, cont in enumerate(continuations):
        values = [first[cont[0]]]
        for t in range(1, len(cont)):
            values.append(rest[i, t - 1, cont[t]])
        out.append(torch.stack(values))
    return out


# ------------------------------------------------------------------------ one agent per process
def _worker(conn, factory: Callable[..., Any], args: tuple, threads: int) -> None:
    """Worker loop: build the agent, then answer ``(request id, method, args)`` until ``None`` arrives."""
    torch.set_num_threads(max(1, threads))
    try:
        agent = factory(*args)
        conn.send(("ready", None))
    except Exception as exc:  # the parent turns this into a clear error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        request_id, method, call_args = message
        try:
            conn.send((request_id, ("ok", getattr(agent, method)(*call_args))))
        except Exception as exc:
            conn.send((request_id, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")))


class ProcessAgent:
    """An agent living in its own process (built there by ``factory(*args)``), reached over a pipe.

    Calls are serialised per agent; a caller that gave up on a call (timeout) does not get a stale
    reply later: replies carry the request id and old ones are discarded."""

    def __init__(self, name: str, factory: Callable[..., Any], args: tuple = (), threads: int = 1,
                 start_timeout_s: float = 600.0) -> None:
        self.name = name
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_worker, args=(child, factory, args, threads), daemon=True,
                                    name=f"aiflow-agent-{name}")
        self._process.start()
        self._lock = threading.Lock()
        self._next_id = 0
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise RuntimeError(f"agent {name}: its process did not start within {start_timeout_s:.0f} s")
        status, detail = self._conn.recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"agent {name}: its process failed to start: {detail}")

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._conn.send((request_id, method, args))
            while True:
                got_id, (status, value) = self._conn.recv()
                if got_id == request_id:
                    break
        if status != "ok":
            raise RuntimeError(f"agent {self.name}: {value}")
        return value

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> AgentReply:
        return self._call("chat", messages, max_new_tokens)

    def begin(self, token_ids: list[int]) -> torch.Tensor:
        return self._call("begin", token_ids)

    def advance(self, token_id: int) -> torch.Tensor:
        return self._call("advance", token_id)

    def score(self, context_ids: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        return self._call("score", context_ids, continuations)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self) -> None:
        """Stop the worker (its own pid only)."""
        try:
            self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
