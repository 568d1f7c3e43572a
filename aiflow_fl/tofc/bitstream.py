"""Real TOFC bitstreams: range coding (``constriction``) of a codec's integer symbols, and their header.

Layout (every byte is on the wire and counted)::

    byte 0      MAGIC (format and version)
    bytes 1-2   codec fingerprint (16 bits of a SHA-256 over the codec's config and weights)
    byte 3      n_c, the number of merged tokens
    varint      number of 32-bit words of range-coder payload
    payload     the range coder's words, little-endian: router choices (uniform over E experts),
                then the hyperlatent ẑ (factorized Laplacians), then the latent symbols of y (Laplacians
                whose scales come from ẑ through the hyper-synthesis net)

Encoder and decoder compute the coding tables from the same integers with
:meth:`TofcCodec.coding_params` (float64, the tokens of each expert as one batch, snapped to fixed tables), so they
build bit-identical models (Cool-Chic's lesson). A stream that is truncated, extended, from another
codec or not a TOFC stream at all is refused with an :class:`AiflowError` that says which.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.tofc.entropy import SYMBOL_MAX, TofcCodec

MAGIC = 0xC7
MAGIC_FP16 = 0xF6  # uncompressed float16 tokens (the baselines without entropy coding)


def codec_fingerprint(codec: TofcCodec) -> int:
    """16-bit identity of a codec: SHA-256 over its config and every parameter's bytes."""
    cached = getattr(codec, "_aiflow_fingerprint", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256(repr(sorted(codec.cfg.to_dict().items())).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    value = int.from_bytes(digest.digest()[:2], "big")
    codec._aiflow_fingerprint = value  # type: ignore[attr-defined]  # weights are frozen once trained
    return value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise AiflowError("TOFC bitstream is truncated: it ends inside its header.")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            raise AiflowError("TOFC bitstream header is corrupt (payload length field too long).")


@dataclass
class Encoded:
    """One image's bitstream and what the model expected it to cost."""

    data: bytes
    n_tokens: int
    estimated_bits: float  # the entropy model's rate of the payload (Σ −log2 P + router bits)

    @property
    def num_bytes(self) -> int:
        return len(self.data)


def _laplace():
    import constriction

    return constriction.stream.model.QuantizedLaplace(-SYMBOL_MAX, SYMBOL_MAX)


def encode_tokens(codec: TofcCodec, merged: torch.Tensor) -> Encoded:
    """Merged tokens (n_c, C) → bitstream (module docstring)."""
    import constriction

    if merged.dim() != 2 or merged.shape[1] != codec.cfg.channels:
        raise AiflowError(
            f"TOFC encoder expects merged tokens of shape (n_c, {codec.cfg.channels}), got {tuple(merged.shape)}."
        )
    n_c = merged.shape[0]
    if not 1 <= n_c <= 255:
        raise AiflowError(f"TOFC bitstreams carry 1..255 merged tokens, got {n_c}.")
    choice, z_hat, symbols, z_scales, scales = codec.symbols_and_tables(merged)
    encoder = constriction.stream.queue.RangeEncoder()
    if codec.cfg.experts > 1:
        encoder.encode(choice.numpy().astype(np.int32), constriction.stream.model.Uniform(codec.cfg.experts))
    laplace = _laplace()
    zeros_z = np.zeros(z_hat.numel(), dtype=np.float64)
    encoder.encode(z_hat.reshape(-1).numpy().astype(np.int32), laplace, zeros_z, z_scales.reshape(-1).numpy())
    zeros_y = np.zeros(symbols.numel(), dtype=np.float64)
    encoder.encode(symbols.reshape(-1).numpy().astype(np.int32), laplace, zeros_y, scales.reshape(-1).numpy())
    words = encoder.get_compressed()
    header = bytes([MAGIC]) + codec_fingerprint(codec).to_bytes(2, "big") + bytes([n_c]) + _varint(len(words))
    data = header + words.astype("<u4").tobytes()
    return Encoded(data, n_c, codec.bits_with_tables(z_hat, symbols, z_scales, scales, n_c))


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """(magic, fingerprint, n_c, payload offset); checks the payload length matches exactly."""
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise AiflowError("TOFC bitstream is empty.")
    magic = data[0]
    if magic not in (MAGIC, MAGIC_FP16):
        raise AiflowError(
            f"Not a TOFC bitstream: first byte is 0x{magic:02x}, expected 0x{MAGIC:02x} (range-coded) "
            f"or 0x{MAGIC_FP16:02x} (float16 tokens)."
        )
    if len(data) < 5:
        raise AiflowError(f"TOFC bitstream is truncated: {len(data)} bytes is shorter than its header.")
    fingerprint = int.from_bytes(data[1:3], "big")
    n_c = data[3]
    length, offset = _read_varint(data, 4)
    unit = 4 if magic == MAGIC else 2
    expected = offset + length * unit
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise AiflowError(f"TOFC bitstream is {what}: {len(data)} bytes, the header announces {expected}.")
    return magic, fingerprint, n_c, offset


def decode_tokens(codec: TofcCodec, data: bytes) -> torch.Tensor:
    """Bitstream → reconstructed merged tokens x̂ = g_s(μ + s), (n_c, C)."""
    choice, z_hat, symbols, means = _decode(codec, data)
    return codec.synthesis((means + symbols.double()).float())


def decode_symbols(codec: TofcCodec, data: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bitstream → the encoder's integers exactly: (router choices, ẑ, y symbols)."""
    return _decode(codec, data)[:3]


def _decode(codec: TofcCodec, data: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router choices, ẑ, y symbols, y means): the means come with the scales, so the tables are built once."""
    import constriction

    magic, fingerprint, n_c, offset = parse_header(data)
    if magic != MAGIC:
        raise AiflowError("This is a float16-token stream, not a range-coded TOFC stream; use decode_fp16.")
    mine = codec_fingerprint(codec)
    if fingerprint != mine:
        raise AiflowError(
            f"TOFC bitstream was made by another codec (fingerprint {fingerprint:04x}, this decoder's is "
            f"{mine:04x}): decode it with the codec (same λ and weights) that encoded it."
        )
    words = np.frombuffer(bytes(data[offset:]), dtype="<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    cfg = codec.cfg
    try:
        if cfg.experts > 1:
            choice = decoder.decode(constriction.stream.model.Uniform(cfg.experts), n_c)
        else:
            choice = np.zeros(n_c, dtype=np.int32)
        choice_t = torch.from_numpy(np.asarray(choice, dtype=np.int64))
        if int(choice_t.max()) >= cfg.experts:
            raise AiflowError("TOFC bitstream is corrupt: a router choice names a missing expert.")
        laplace = _laplace()
        z_scale_rows = codec.z_prior_scales(choice_t)
        z = decoder.decode(laplace, np.zeros(n_c * cfg.hyper), z_scale_rows.reshape(-1).numpy())
        z_hat = torch.from_numpy(np.asarray(z, dtype=np.int64)).reshape(n_c, cfg.hyper)
        _, means, scales = codec.coding_params(z_hat, choice_t)
        y = decoder.decode(laplace, np.zeros(n_c * cfg.latent), scales.reshape(-1).numpy())
    except AiflowError:
        raise
    except Exception as exc:  # constriction raises on an impossible stream
        raise AiflowError(f"TOFC bitstream is corrupt: the range decoder failed ({exc}).") from exc
    symbols = torch.from_numpy(np.asarray(y, dtype=np.int64)).reshape(n_c, cfg.latent)
    return choice_t, z_hat, symbols, means


def encode_fp16(tokens: torch.Tensor) -> bytes:
    """Tokens (n, C) as raw float16 with the same header (fingerprint 0): the uncompressed baseline."""
    if tokens.dim() != 2 or tokens.shape[0] > 255:
        raise AiflowError(f"float16 token streams carry (n ≤ 255, C) tokens, got {tuple(tokens.shape)}.")
    payload = tokens.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
    return bytes([MAGIC_FP16, 0, 0, tokens.shape[0]]) + _varint(len(payload) // 2) + payload


def decode_fp16(data: bytes, channels: int) -> torch.Tensor:
    magic, _, n, offset = parse_header(data)
    if magic != MAGIC_FP16:
        raise AiflowError("This is a range-coded TOFC stream, not float16 tokens; decode it with its codec.")
    values = np.frombuffer(bytes(data[offset:]), dtype="<f2")
    if values.size != n * channels:
        raise AiflowError(f"float16 token stream holds {values.size} values, expected {n}×{channels}.")
    return torch.from_numpy(values.astype(np.float32).reshape(n, channels))


