"""Verifier tiers over HTTP: the tier protocol, served by ``aiflow serve`` next to the OpenAI API.

A verifier tier is its own ``aiflow serve --tier edge|cloud`` process (FastAPI + uvicorn, see
:mod:`aiflow_fl.serving.api`); the device-side chain drafts locally and sends each block to it.
Each generation is a *session* with its own KV cache on the tier. ``POST /tier/process`` carries
one forward in a small binary frame (token ids / hidden states are too big for JSON)::

    body     = 4-byte big-endian header length | JSON header | tensor bytes
               header: session, member, start, entry, temperature, want_hidden,
                       kind ("tokens" int32 | "hidden" float32), n
    response = same framing; header: n, preds ("ids" int32 | "probs" float32), vocab, hidden (bool)

Correctness rules (:class:`TierSessions`): every header field is type- and range-checked and the
body length must match it (400 otherwise); ``start + n`` may not pass the member's context (400);
a session the tier does not hold (never opened, or evicted when more sessions than
``serving.api.max_sessions`` were open) can only be opened at ``start = 0`` — a request that
continues it is a 409 ``session_unknown``, and one that skips positions a 409 ``session_gap``: the
tier never answers from a cache it does not have. Sessions have their own locks (no lock is held
across sessions); a busy session is never evicted. ``DELETE /tier/sessions/{id}`` frees one.

:class:`RemoteTier` is the chain's side: it keeps the inputs it sent for its session, so on a 409
it re-sends the whole prefix once (``start = 0``) and goes on; any other failure (refused, timeout,
5xx) is a :class:`~aiflow_fl.serving.chain.TierUnavailable`, which the chain handles by its
``on_verifier_loss`` policy — never a hang, never a wrong token.
"""

from __future__ import annotations

import json
import ssl
import struct
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import Member
from aiflow_fl.serving.chain import TierUnavailable
from aiflow_fl.serving.tiers import LocalTier, TierOutput


def pack(header: dict, *arrays: np.ndarray) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)


def unpack(body: bytes) -> tuple[dict, memoryview]:
    """Split a frame; a malformed one raises ValueError (the server answers 400)."""
    if len(body) < 4:
        raise ValueError("the body is shorter than its 4-byte header length")
    (size,) = struct.unpack(">I", body[:4])
    if size > len(body) - 4:
        raise ValueError(f"the header length ({size}) is longer than the body ({len(body) - 4} bytes)")
    try:
        header = json.loads(bytes(body[4:4 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, memoryview(body)[4 + size:]


class TierHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    session: str = Field(min_length=1, max_length=64)
    member: str | None = None
    start: int = Field(ge=0)
    entry: int = Field(ge=0)
    temperature: float = Field(ge=0.0)
    want_hidden: bool
    kind: Literal["tokens", "hidden"]
    n: int = Field(ge=1)


class TierRequestError(Exception):
    """A tier request the tier refuses: (status, message, code)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class _Session:
    tier: LocalTier
    positions: int = 0  # positions the session's cache holds
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: int = 0


class TierSessions:
    """The tier side of the protocol for the members one server holds (module docstring)."""

    def __init__(self, members: dict[str, Member], context: dict[str, int], max_sessions: int = 8,
                 default: str | None = None) -> None:
        self.members, self.context, self.max_sessions = members, context, max_sessions
        self.default = default or (next(iter(members)) if members else None)
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.registry = threading.Lock()  # only around lookups, inserts and evictions
        self.evicted = 0

    def info(self) -> dict:
        import os

        return {"default": self.default, "pid": os.getpid(), "max_sessions": self.max_sessions, "sessions": len(self.sessions),
                "evicted": self.evicted,
                "members": [{"name": m.name, "exit_layer": m.exit_layer, "shared_layers": m.shared_layers,
                             "branch": m.branch, "hidden_size": m.hidden_size, "max_len": self.context[m.name]}
                            for m in self.members.values()]}

    def _header(self, raw: dict) -> TierHeader:
        try:
            return TierHeader.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(x) for x in first["loc"]) or None
            what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise TierRequestError(400, f"tier header field '{name}': {what}", "invalid_header", name) from None

    def _open(self, header: TierHeader, member: Member) -> _Session:
        with self.registry:
            session = self.sessions.get(header.session)
            if session is None:
                if header.start != 0:
                    raise TierRequestError(409, f"session '{header.session}' is not held by this tier (never opened, or "
                                           f"evicted); re-send its prefix from start 0", "session_unknown", "session")
                idle = [k for k, s in self.sessions.items() if not s.busy]
                while len(self.sessions) >= self.max_sessions and idle:
                    del self.sessions[idle.pop(0)]  # least recently used first
                    self.evicted += 1
                if len(self.sessions) >= self.max_sessions:
                    raise TierRequestError(503, f"all {self.max_sessions} sessions of this tier are busy", "busy")
                session = self.sessions[header.session] = _Session(LocalTier(member, header.entry))
            elif session.tier.member is not member or session.tier.entry != header.entry:
                raise TierRequestError(400, f"session '{header.session}' was opened for member {session.tier.member.name} "
                                       f"at layer {session.tier.entry}, not {member.name} at {header.entry}", "session_mismatch")
            self.sessions.move_to_end(header.session)
            session.busy += 1
            return session

    def process(self, body: bytes) -> bytes:
        """One forward of one session (module docstring); raises TierRequestError for a bad request."""
        try:
            raw, data = unpack(body)
        except ValueError as exc:
            raise TierRequestError(400, f"malformed tier request: {exc}", "invalid_frame") from None
        header = self._header(raw)
        name = header.member or self.default
        member = self.members.get(name or "")
        if member is None:
            raise TierRequestError(404, f"this tier holds no member '{name}' (it holds {', '.join(self.members)})",
                                   "model_not_found", "member")
        if header.entry > member.exit_layer:
            raise TierRequestError(400, f"entry layer {header.entry} is above member {member.name}'s {member.exit_layer} layers",
                                   "invalid_header", "entry")
        if header.start + header.n > self.context[member.name]:
            raise TierRequestError(400, f"This model's maximum context length is {self.context[member.name]} tokens. However, "
                                   f"positions up to {header.start + header.n} were requested.", "context_length_exceeded", "n")
        width = 4 * header.n * (1 if header.kind == "tokens" else member.hidden_size)
        if len(data) != width:
            raise TierRequestError(400, f"the body carries {len(data)} tensor bytes; n={header.n} {header.kind} need {width}",
                                   "invalid_frame", "n")
        if header.kind == "tokens":
            tokens = torch.from_numpy(np.frombuffer(data, dtype=np.int32).astype(np.int64))
            vocab = int(member.model.config.vocab_size)
            if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
                raise TierRequestError(400, f"token ids must be in 0..{vocab - 1}", "invalid_tokens", "tokens")
            inputs = {"tokens": tokens}
        else:
            if header.entry == 0:
                raise TierRequestError(400, "hidden states need an entry layer > 0", "invalid_header", "entry")
            hidden = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy()).view(header.n, member.hidden_size)
            inputs = {"hidden": hidden}
        session = self._open(header, member)
        try:
            with session.lock:  # this session only: others run at the same time
                if header.start > session.positions:
                    raise TierRequestError(409, f"session '{header.session}' holds {session.positions} positions; a request "
                                           f"starting at {header.start} would skip some (re-send the prefix)", "session_gap", "start")
                out = session.tier.process(header.start, temperature=header.temperature, want_hidden=header.want_hidden, **inputs)
                session.positions = header.start + header.n
        finally:
            with self.registry:
                session.busy -= 1
        sampling = out.preds.dim() == 2
        preds = out.preds.float().numpy() if sampling else out.preds.to(torch.int32).numpy()
        arrays = [preds] + ([out.hidden.float().numpy()] if out.hidden is not None else [])
        return pack({"n": header.n, "preds": "probs" if sampling else "ids", "vocab": int(out.preds.shape[-1]) if sampling else 0,
                     "hidden": out.hidden is not None}, *arrays)

    def close(self, session: str) -> bool:
        with self.registry:
            return self.sessions.pop(session, None) is not None


class RemoteTier:
    """A tier served by another ``aiflow serve`` process (module docstring)."""

    def __init__(self, url: str, entry: int = 0, timeout_s: float = 10.0, name: str | None = None,
                 member: str | None = None, api_key: str | None = None, ca_file: str | None = None,
                 info: dict | None = None) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise AiflowError(f"Tier address '{url}' must look like http://HOST:PORT or https://HOST:PORT.")
        self.url = url.rstrip("/")
        self.timeout_s, self.entry = timeout_s, entry
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers, verify=verify)
        self.session = uuid.uuid4().hex
        self.bytes_sent = self.bytes_received = 0
        self.resends = 0  # prefixes re-sent after the tier lost the session (409)
        self._inputs: list[torch.Tensor] = []  # what this session sent, one row per position
        self.info = info or self._info()
        chosen = member or self.info["default"]
        spec = next((m for m in self.info["members"] if m["name"] == chosen), None)
        if spec is None:
            raise AiflowError(f"The tier at {self.url} holds no member '{chosen}' "
                              f"(it holds {', '.join(m['name'] for m in self.info['members'])}).")
        self.member = chosen
        self.name = name or chosen
        self.exit_layer, self.shared_layers = int(spec["exit_layer"]), int(spec["shared_layers"])
        self.hidden_size, self.max_len = int(spec["hidden_size"]), int(spec["max_len"])

    def _info(self) -> dict:
        import httpx

        try:
            response = self._client.get("/tier/info")
        except httpx.HTTPError as exc:
            raise AiflowError(f"No tier server answers at {self.url} ({type(exc).__name__}: {exc}). "
                              "Start one with `aiflow serve --tier ...`.") from None
        if response.status_code != 200:
            raise AiflowError(f"The tier at {self.url} answered {response.status_code} to /tier/info: {response.text[:300]}")
        return response.json()

    def _post(self, header: dict, array: np.ndarray) -> tuple[int, bytes]:
        import httpx

        body = pack(header, array)
        try:
            response = self._client.post("/tier/process", content=body, headers={"Content-Type": "application/octet-stream"})
        except httpx.HTTPError as exc:
            raise TierUnavailable(f"{self.url} {type(exc).__name__}: {exc}") from None
        self.bytes_sent += len(body)
        self.bytes_received += len(response.content)
        return response.status_code, response.content

    def reset(self) -> None:
        self.close_session()
        self.session = uuid.uuid4().hex  # a fresh cache on the tier
        self._inputs = []

    def process(self, start: int, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                temperature: float = 0.0, want_hidden: bool = True) -> TierOutput:
        kind = "tokens" if tokens is not None else "hidden"
        new = tokens.to(torch.int32) if tokens is not None else hidden.float()
        n = int(new.shape[0])
        del self._inputs[start:]
        if len(self._inputs) != start:
            raise TierUnavailable(f"{self.url}: asked to start at {start} with {len(self._inputs)} positions sent")
        self._inputs.extend(new)
        header = {"session": self.session, "member": self.member, "start": start, "entry": self.entry,
                  "temperature": temperature, "want_hidden": want_hidden, "kind": kind, "n": n}
        status, data = self._post(header, new.numpy())
        skip = 0
        if status == 409 and start > 0:  # the tier lost this session: re-send the whole prefix once
            self.resends += 1
            everything = torch.stack(self._inputs)
            status, data = self._post({**header, "start": 0, "n": int(everything.shape[0])}, everything.numpy())
            skip = start
        if status != 200:
            raise TierUnavailable(f"{self.url} answered {status}: {data[:300].decode(errors='replace')}")
        reply, payload = unpack(data)
        total = int(reply["n"])
        if reply["preds"] == "ids":
            preds = torch.from_numpy(np.frombuffer(payload, dtype=np.int32, count=total).astype(np.int64))
            offset = total * 4
        else:
            vocab = int(reply["vocab"])
            preds = torch.from_numpy(np.frombuffer(payload, dtype=np.float32, count=total * vocab).copy()).view(total, vocab)
            offset = total * vocab * 4
        out_hidden = None
        if reply["hidden"]:
            out_hidden = torch.from_numpy(np.frombuffer(payload[offset:], dtype=np.float32, count=total * self.hidden_size)
                                          .copy()).view(total, self.hidden_size)[skip:]
        return TierOutput(out_hidden, preds[skip:])

    def close_session(self) -> None:
        """Free this session's cache on the tier (best effort: a gone tier has nothing to free)."""
        import httpx

        try:
            self._client.delete(f"/tier/sessions/{self.session}", timeout=min(2.0, self.timeout_s))
        except httpx.HTTPError:
            pass

    def close(self) -> None:
        self.close_session()
        self._client.close()
