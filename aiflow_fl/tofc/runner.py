"""Device and edge sides of TOFC, :func:`ask`, and the edge as a second process on loopback.

Device: image → EfficientNet-Lite0 tokens → standardize → DPC-KNN merge → range-coded bitstream.
Edge: bitstream → the codec whose fingerprint the header names → x̂ → projector → language member →
the answer (scored among the 13 easy-VQA answers, and the member's own generated text).
Latency = device compute + the link model's transfer time for the real bytes
(:class:`aiflow_fl.serving.link.Link`, 8·bytes / rate + latency) + edge compute.

Two processes: :func:`serve_edge` listens on 127.0.0.1; a request is a 4-byte big-endian length +
JSON ``{"question": …}``, then a 4-byte length + the bitstream; the reply is a 4-byte length + JSON.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.serving.link import Link
from aiflow_fl.tofc.bitstream import Encoded, codec_fingerprint, decode_tokens, encode_tokens, parse_header
from aiflow_fl.tofc.merge import dpc_knn_merge


@dataclass
class DeviceResult:
    bitstream: bytes
    n_tokens: int
    estimated_bits: float
    lam: float
    device_s: float


@dataclass
class EdgeResult:
    answer: str  # the member's highest-scored answer among the 13
    text: str  # the member's greedy generated answer text ("" when not asked for)
    edge_s: float


@dataclass
class AskResult:
    """What :func:`ask` returns: the answer, the bytes on the wire and the latency decomposition."""

    answer: str
    text: str
    num_bytes: int
    estimated_bits: float
    n_tokens: int
    lam: float
    device_s: float
    link_s: float
    edge_s: float
    link_kbps: float
    transport: str  # "in-process" or "loopback"
    wire_s: float = 0.0  # measured loopback round trip (two processes only)
    latency_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.latency_s = self.device_s + self.link_s + self.edge_s

    def to_dict(self) -> dict:
        return asdict(self)


def device_encode(system, image: np.ndarray, lam: float | None = None) -> DeviceResult:
    """The device side for one RGB uint8 image (64 × 64 × 3)."""
    from aiflow_fl.tofc.encoder import encode_images

    start = time.perf_counter()
    lam, codec = system.codec(lam)
    with torch.no_grad():
        tokens = system.stats.standardize(encode_images(system.token_encoder(), image[None]))
        merged = dpc_knn_merge(tokens, system.cfg.merged_tokens, system.cfg.knn)[0]
        encoded: Encoded = encode_tokens(codec, merged)
    return DeviceResult(encoded.data, encoded.n_tokens, encoded.estimated_bits, lam, time.perf_counter() - start)


def codec_for_stream(system, data: bytes):
    """The system's codec whose fingerprint the stream's header carries."""
    _, fingerprint, _, _ = parse_header(data)
    for lam, codec in system.codecs.items():
        if codec_fingerprint(codec) == fingerprint:
            return lam, codec
    raise AiflowError(
        f"TOFC bitstream was made by a codec this edge does not have (fingerprint {fingerprint:04x}; "
        f"this edge has λ = {', '.join(f'{k:g}' for k in sorted(system.codecs))})."
    )


def edge_answer(system, data: bytes, question: str, generate: bool = True) -> EdgeResult:
    """The edge side: decode, project, answer."""
    if not question or not question.strip():
        raise AiflowError("The question is empty.")
    start = time.perf_counter()
    _, codec = codec_for_stream(system, data)
    with torch.no_grad():
        visual = decode_tokens(codec, data)[None]
        index = int(system.edge.predict(visual, [question.strip()])[0])
        scored_s = time.perf_counter() - start
        text = system.edge.generate(visual, question.strip()) if generate else ""
    return EdgeResult(system.edge.answers[index], text, scored_s)


def ask(image, question: str, lam: float | None = None, two_process: bool = False, link_kbps: float = 64.0,
        link_latency_ms: float = 5.0, system=None, overrides: list[str] | None = None, resize: bool = False,
        edge_url: str | None = None) -> AskResult:
    """Answer ``question`` about ``image`` (a path, encoded bytes or an RGB uint8 array) through TOFC.

    Uses the trained system of the configured recipe (``aiflow tofc train`` first). ``edge_url``
    (``tcp://127.0.0.1:PORT`` of ``aiflow tofc edge``): the real bitstream goes over the socket to
    that edge process. ``two_process``: the same with an edge process started for this call.
    The reported latency is device + link (the link model at ``link_kbps``) + edge (the scored
    answer's compute; generating the text is not counted).
    """
    from aiflow_fl.tofc.encoder import load_image

    if system is None:
        system = load(overrides)
    pixels = image if isinstance(image, np.ndarray) else load_image(image, resize=resize)
    if pixels.dtype != np.uint8 or pixels.shape != (64, 64, 3):
        raise AiflowError(f"Expected a 64×64 RGB uint8 image, got {pixels.dtype} {pixels.shape}.")
    device = device_encode(system, pixels, lam)
    link = Link(name="device-edge", latency_ms=link_latency_ms, bandwidth_mbps=link_kbps / 1000.0)
    link_s = link.send(len(device.bitstream), up=True, sleep=False)
    if not question or not question.strip():
        raise AiflowError("The question is empty.")
    if edge_url or two_process:
        if edge_url:
            start = time.perf_counter()
            reply = ask_edge(edge_url, device.bitstream, question)
            wire_s = time.perf_counter() - start - reply["edge_s"]
        else:
            with EdgeProcess(overrides) as edge_proc:
                start = time.perf_counter()
                reply = edge_proc.ask(device.bitstream, question)
                wire_s = time.perf_counter() - start - reply["edge_s"]
        if reply.get("bytes_received") != len(device.bitstream):
            raise AiflowError(f"The TOFC edge received {reply.get('bytes_received')} bytes, the device sent {len(device.bitstream)}.")
        edge = EdgeResult(reply["answer"], reply["text"], reply["edge_s"])
        transport = "loopback"
    else:
        edge, wire_s, transport = edge_answer(system, device.bitstream, question), 0.0, "in-process"
    return AskResult(edge.answer, edge.text, len(device.bitstream), device.estimated_bits, device.n_tokens, device.lam,
                     device.device_s, link_s, edge.edge_s, link_kbps, transport, wire_s)


def load(overrides: list[str] | None = None):
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.system import load_system

    return load_system(load_config(list(overrides or [])))


# ---- the edge as a process ------------------------------------------------------------------------

def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise AiflowError("The TOFC edge connection closed in the middle of a message.")
        chunks.extend(chunk)
    return bytes(chunks)


MAX_FRAME = 1 << 24  # 16 MiB: far above any image's bitstream, refuses a garbage length field


def _recv_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if length > MAX_FRAME:
        raise AiflowError(f"TOFC message announces {length} bytes, more than the {MAX_FRAME} allowed.")
    return _recv_exact(sock, length)


def serve_edge(system, port: int = 0, ready=print) -> None:
    """Serve edge answers on 127.0.0.1:port until killed; prints ``READY PORT n`` when listening."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                header = json.loads(_recv_frame(self.request))
                data = _recv_frame(self.request)
                result = edge_answer(system, data, header.get("question", ""), generate=header.get("generate", True))
                reply = {"ok": True, "answer": result.answer, "text": result.text, "edge_s": result.edge_s,
                         "bytes_received": len(data)}
            except AiflowError as exc:
                reply = {"ok": False, "error": str(exc)}
            except ValueError as exc:  # a request header that is not JSON
                reply = {"ok": False, "error": f"malformed request ({exc})"}
            _send_frame(self.request, json.dumps(reply).encode())

    socketserver.TCPServer.allow_reuse_address = True
    with socketserver.TCPServer(("127.0.0.1", port), Handler) as server:
        ready(f"READY PORT {server.server_address[1]} tcp://127.0.0.1:{server.server_address[1]}")
        sys.stdout.flush()
        server.serve_forever()


def parse_edge_url(url: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` or ``HOST:PORT`` → (host, port)."""
    rest = url[len("tcp://"):] if url.startswith("tcp://") else url
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AiflowError(f"Edge URL '{url}' is not tcp://HOST:PORT (as `aiflow tofc edge` prints it).")
    return host, int(port)


def ask_edge(url: str, data: bytes, question: str, generate: bool = True, timeout_s: float = 300.0) -> dict:
    """Send one question and bitstream to an edge process; its JSON reply (AiflowError if it refused)."""
    host, port = parse_edge_url(url)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            _send_frame(sock, json.dumps({"question": question, "generate": generate}).encode())
            _send_frame(sock, data)
            reply = json.loads(_recv_frame(sock))
    except OSError as exc:
        raise AiflowError(f"Cannot reach the TOFC edge at {url} ({exc}).") from exc
    if not reply.get("ok"):
        raise AiflowError(f"TOFC edge: {reply.get('error')}")
    return reply


class EdgeProcess:
    """``aiflow tofc edge --port 0`` as a child process serving the edge on a free loopback port."""

    def __init__(self, overrides: list[str] | None = None, timeout_s: float = 300.0) -> None:
        self.overrides = list(overrides or [])
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "EdgeProcess":
        import os

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "aiflow_fl.cli", "tofc", "edge", "--port", "0", *self.overrides],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + self.timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AiflowError("The TOFC edge process exited before it was ready (is the system trained?).")
            if line.startswith("READY PORT "):
                self.port = int(line.split()[2])  # READY PORT n URL
                return self
        raise AiflowError("The TOFC edge process did not become ready in time.")

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def ask(self, data: bytes, question: str, generate: bool = True) -> dict:
        return ask_edge(self.url, data, question, generate, self.timeout_s)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
