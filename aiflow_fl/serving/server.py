"""Multi-process tiers: a verifier as its own HTTP server on loopback, and the client the chain uses.

``aiflow serve --tier edge ...`` runs :func:`serve`: one member behind a tiny HTTP/1.1 server
(stdlib ``http.server``, a thread per connection; forwards run one at a time under a lock). Each
generation is a *session* with its own KV cache. ``POST /process`` carries one forward:

    request  = 4-byte big-endian header length | JSON header | tensor bytes
               header: session, start, entry, temperature, want_hidden, kind ("tokens" int32 | "hidden" float32), n
    response = same framing; header: n, preds ("ids" int32 | "probs" float32), hidden (bool) — then preds, hidden

:class:`RemoteTier` is the client side: every failure (refused, timeout, bad answer) becomes a
:class:`~aiflow_fl.serving.chain.TierUnavailable`, which makes the chain drop the tier with a warning
and go on (device-only at worst) — never a hang. It counts the real bytes sent and received.
"""

from __future__ import annotations

import http.client
import json
import os
import struct
import sys
import threading
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import Member
from aiflow_fl.serving.chain import TierUnavailable
from aiflow_fl.serving.tiers import LocalTier, TierOutput

MAX_SESSIONS = 8


def pack(header: dict, *arrays: np.ndarray) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)


def unpack(body: bytes) -> tuple[dict, memoryview]:
    (size,) = struct.unpack(">I", body[:4])
    return json.loads(body[4:4 + size]), memoryview(body)[4 + size:]


class TierService:
    """One family Member and its sessions (each session = one LocalTier with its own caches)."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.sessions: OrderedDict[str, LocalTier] = OrderedDict()
        self.lock = threading.Lock()

    def info(self) -> dict:
        m = self.member
        return {"name": m.name, "exit_layer": m.exit_layer, "shared_layers": m.shared_layers,
                "branch": m.branch, "hidden_size": m.hidden_size, "pid": os.getpid()}

    def process(self, body: bytes) -> bytes:
        header, data = unpack(body)
        n, hidden_size = int(header["n"]), self.member.hidden_size
        with self.lock:
            tier = self.sessions.get(header["session"])
            if tier is None or tier.entry != header["entry"]:
                tier = LocalTier(self.member, int(header["entry"]))
                self.sessions[header["session"]] = tier
                while len(self.sessions) > MAX_SESSIONS:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(header["session"])
            if header["kind"] == "tokens":
                tokens = torch.from_numpy(np.frombuffer(data, dtype=np.int32, count=n).astype(np.int64))
                out = tier.process(int(header["start"]), tokens=tokens, temperature=float(header["temperature"]),
                                   want_hidden=bool(header["want_hidden"]))
            else:
                hidden = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=n * hidden_size).copy()).view(n, hidden_size)
                out = tier.process(int(header["start"]), hidden=hidden, temperature=float(header["temperature"]),
                                   want_hidden=bool(header["want_hidden"]))
        sampling = out.preds.dim() == 2
        preds = out.preds.float().numpy() if sampling else out.preds.to(torch.int32).numpy()
        arrays = [preds] + ([out.hidden.float().numpy()] if out.hidden is not None else [])
        return pack({"n": n, "preds": "probs" if sampling else "ids", "vocab": int(out.preds.shape[-1]) if sampling else 0,
                     "hidden": out.hidden is not None}, *arrays)


def _handler(service: TierService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: one line per forward would flood the terminal
            pass

        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, json.dumps(service.info()).encode(), "application/json")
            else:
                self._reply(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/process":
                self._reply(404, b"not found", "text/plain")
                return
            try:
                self._reply(200, service.process(body), "application/octet-stream")
            except Exception as exc:  # a bad request must not kill the tier; the client sees a 500
                self._reply(500, f"{type(exc).__name__}: {exc}".encode(), "text/plain")

    return Handler


def serve(member: Member, host: str = "127.0.0.1", port: int = 0, core: int | None = None, threads: int | None = None) -> None:
    """Serve ``member`` until killed; prints ``READY <port>`` once listening (for scripts and tests)."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    if threads:
        torch.set_num_threads(threads)
    server = ThreadingHTTPServer((host, port), _handler(TierService(member)))  # a thread per connection (keep-alive)
    print(f"READY {server.server_address[1]} tier={member.name} exit={member.exit_layer} pid={os.getpid()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class RemoteTier:
    """A tier served by another process (see module docstring)."""

    def __init__(self, url: str, entry: int = 0, timeout_s: float = 10.0, name: str | None = None) -> None:
        if not url.startswith("http://"):
            raise AiflowError(f"Tier address '{url}' must look like http://HOST:PORT.")
        self.host, _, port = url[len("http://"):].rstrip("/").partition(":")
        self.port = int(port or 80)
        self.timeout_s = timeout_s
        self.entry = entry
        self.session = uuid.uuid4().hex
        self.bytes_sent = self.bytes_received = 0
        self._conn: http.client.HTTPConnection | None = None
        self.info = self._health()
        self.name = name or self.info["name"]
        self.exit_layer = int(self.info["exit_layer"])
        self.shared_layers = int(self.info["shared_layers"])
        self.hidden_size = int(self.info["hidden_size"])

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            raise TierUnavailable(f"{self.host}:{self.port} {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            raise TierUnavailable(f"{self.host}:{self.port} answered {response.status}: {data[:200].decode(errors='replace')}")
        self.bytes_sent += len(body or b"")
        self.bytes_received += len(data)
        return data

    def _health(self) -> dict:
        try:
            return json.loads(self._request("GET", "/health"))
        except TierUnavailable as exc:
            raise AiflowError(f"No tier server answers at http://{self.host}:{self.port} ({exc}). Start one with `aiflow serve --tier ...`.") from None

    def reset(self) -> None:
        self.session = uuid.uuid4().hex  # the server starts a fresh cache for a new session

    def process(self, start: int, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                temperature: float = 0.0, want_hidden: bool = True) -> TierOutput:
        kind = "tokens" if tokens is not None else "hidden"
        array = tokens.to(torch.int32).numpy() if tokens is not None else hidden.float().numpy()
        n = int(array.shape[0])
        header = {"session": self.session, "start": start, "entry": self.entry, "temperature": temperature,
                  "want_hidden": want_hidden, "kind": kind, "n": n}
        reply, data = unpack(self._request("POST", "/process", pack(header, array)))
        if reply["preds"] == "ids":
            preds = torch.from_numpy(np.frombuffer(data, dtype=np.int32, count=n).astype(np.int64))
            offset = n * 4
        else:
            vocab = int(reply["vocab"])
            preds = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=n * vocab).copy()).view(n, vocab)
            offset = n * vocab * 4
        out_hidden = None
        if reply["hidden"]:
            out_hidden = torch.from_numpy(np.frombuffer(data[offset:], dtype=np.float32, count=n * self.hidden_size).copy()).view(n, self.hidden_size)
        return TierOutput(out_hidden, preds)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
