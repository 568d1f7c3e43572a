"""A scale-hyperprior entropy model with routed experts for merged visual tokens (paper §II-B1).

Per merged token x (C channels, standardized encoder features):

* latent transform y = g_a(x) ∈ R^D and its inverse x̂ = g_s(ŷ) (learned, so λ trades rate for
  accuracy — quantizing x itself would fix the precision);
* E experts e, each a scale hyperprior (Ballé et al., ICLR 2018): hyper-analysis z = h_a^e(y) ∈ R^Dz
  (Dz ≈ D/8) with a *factorized* prior (one zero-mean Laplacian per channel, learned scale), and
  hyper-synthesis (μ, b) = h_s^e(ẑ): mean and scale of a Laplacian for each element of y;
* quantization around the predicted mean, ŷ = μ + round(y − μ), with a straight-through estimator
  (STE: forward rounds, backward is the identity) in training; the coded symbol is s = round(y − μ);
* the rate of an integer symbol s under Laplace(0, b) is −log2 P(s) with
  P(s) = F(s + ½) − F(s − ½) (the continuous relaxation of the paper's quantized Laplacian);
* a router scores the experts per token. Training: weights w = softmax(scores / T), x̂ and the rate
  are the w-weighted sums over experts, and the balance loss is Σ_e (mean_tokens w_e − 1/E)².
  Inference: only the top-1 expert codes the token; its index is sent (log2 E bits, uniform model).

Cool-Chic's lesson for real bitstreams: at inference the scales (and means) are snapped to fixed
tables (:func:`quantize_scale`, :func:`quantize_mean`) so the encoder and decoder, computing them from
the same integer ẑ, build bit-identical entropy models (see :mod:`aiflow_fl.tofc.bitstream`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

LOG2 = math.log(2.0)
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.04, 40.0, 64
MEAN_STEP = 1.0 / 64
SYMBOL_MAX = 1023  # symbols are clamped to [−SYMBOL_MAX, SYMBOL_MAX] (counted in CodecStats)
PROB_FLOOR = 1e-9


@dataclass
class CodecConfig:
    """Shape of a TOFC codec. ``channels``: C of the encoder tokens; ``latent``: D; ``hyper``: Dz."""

    channels: int = 112
    latent: int = 32
    hyper: int = 4
    experts: int = 4
    hidden: int = 128
    temperature: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def scale_table(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The fixed, log-spaced table every Laplacian scale is snapped to at inference."""
    return torch.exp(torch.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS, dtype=dtype))


def quantize_scale(scale: torch.Tensor) -> torch.Tensor:
    """Snap scales to :func:`scale_table` (nearest entry in log space)."""
    step = (math.log(SCALE_MAX) - math.log(SCALE_MIN)) / (SCALE_LEVELS - 1)
    index = torch.round((scale.double().clamp(SCALE_MIN, SCALE_MAX).log() - math.log(SCALE_MIN)) / step)
    return scale_table()[index.long().clamp(0, SCALE_LEVELS - 1)]


def quantize_mean(mean: torch.Tensor) -> torch.Tensor:
    """Snap means to the grid MEAN_STEP·Z."""
    return torch.round(mean.double() / MEAN_STEP) * MEAN_STEP


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def laplace_bits(symbol: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """−log2 P(s) for integer-valued s under a zero-mean Laplacian of scale b, P = F(s+½) − F(s−½).

    For |s| < ½ (s = 0): P = 1 − exp(−½/b); otherwise P = ½·exp(−(|s|−½)/b)·(1 − exp(−1/b)).
    Differentiable in s (for STE-rounded symbols) and b.
    """
    a = symbol.abs()
    zero = -torch.expm1(-0.5 / scale)
    tail = 0.5 * torch.exp(-(a - 0.5).clamp(min=0) / scale) * (-torch.expm1(-1.0 / scale))
    prob = torch.where(a < 0.5, zero, tail)
    return -torch.log(prob.clamp(min=PROB_FLOOR)) / LOG2


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Σ_e (mean over tokens of w_e − 1/E)² for router weights of shape (..., E)."""
    experts = weights.shape[-1]
    usage = weights.reshape(-1, experts).mean(dim=0)
    return ((usage - 1.0 / experts) ** 2).sum()


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, out))


class Expert(nn.Module):
    """One scale hyperprior: h_a (y → z), h_s (ẑ → μ, b) and the factorized prior scales of z."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.hyper_analysis = _mlp(cfg.latent, cfg.hidden // 2, cfg.hyper)
        self.hyper_synthesis = _mlp(cfg.hyper, cfg.hidden // 2, 2 * cfg.latent)
        self.z_log_scale = nn.Parameter(torch.zeros(cfg.hyper))

    def z_scale(self) -> torch.Tensor:
        return self.z_log_scale.exp().clamp(SCALE_MIN, SCALE_MAX)

    def mean_scale(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, b) of y's Laplacians from the quantized hyperlatent."""
        mean, raw = self.hyper_synthesis(z_hat).chunk(2, dim=-1)
        return mean, nn.functional.softplus(raw).clamp(SCALE_MIN, SCALE_MAX)


@dataclass
class CodecOutput:
    """Training-mode forward: reconstruction, bits per image (estimated), balance loss, router weights."""

    reconstruction: torch.Tensor  # (B, n_c, C)
    bits: torch.Tensor  # (B,)
    balance: torch.Tensor  # scalar
    weights: torch.Tensor  # (B, n_c, E)


class TofcCodec(nn.Module):
    """Latent transform + E hyperprior experts + router (module docstring)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.analysis = _mlp(cfg.channels, cfg.hidden, cfg.latent)
        self.synthesis = _mlp(cfg.latent, cfg.hidden, cfg.channels)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.experts))
        self.router = nn.Linear(cfg.channels, cfg.experts)

    def route_bits(self) -> float:
        """Bits of one router choice (uniform model over the E experts; 0 for a single expert)."""
        return math.log2(self.cfg.experts) if self.cfg.experts > 1 else 0.0

    def forward(self, x: torch.Tensor) -> CodecOutput:
        """Training forward (soft routing, STE quantization) for merged tokens x (B, n_c, C)."""
        y = self.analysis(x)
        weights = torch.softmax(self.router(x) / self.cfg.temperature, dim=-1)  # (B, n, E)
        recon = torch.zeros_like(x)
        bits = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            z_hat = ste_round(expert.hyper_analysis(y))
            z_bits = laplace_bits(z_hat, expert.z_scale()).sum(-1)
            mean, scale = expert.mean_scale(z_hat)
            symbols = ste_round(y - mean)
            y_bits = laplace_bits(symbols, scale).sum(-1)
            w = weights[..., e]
            recon = recon + w[..., None] * self.synthesis(mean + symbols)
            bits = bits + w * (z_bits + y_bits)
        bits = bits + self.route_bits()
        return CodecOutput(recon, bits.sum(-1), balance_loss(weights), weights)

    # ---- inference: the integer symbols a bitstream carries, and the decoder's inverse ----------

    @torch.no_grad()
    def choose_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 expert per token: (n_c, C) → (n_c,) int64."""
        return self.router(x.float()).argmax(dim=-1)

    def _groups(self, choice: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(expert, token indices) for every expert some token chose, in expert order. Encoder and
        decoder hold the same ``choice``, so they run the same batched shapes (bit-identical tables)."""
        return [(e, (choice == e).nonzero().flatten()) for e in torch.unique(choice).tolist()]

    @torch.no_grad()
    def hyper_symbols(self, y: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """ẑ = round(h_a^e(y)) for each token with its chosen expert: (n_c, Dz) int64."""
        z = y.new_zeros(len(choice), self.cfg.hyper)
        for e, rows in self._groups(choice):
            z[rows] = self.experts[e].hyper_analysis(y[rows])
        return torch.round(z).long().clamp(-SYMBOL_MAX, SYMBOL_MAX)

    @torch.no_grad()
    def z_prior_scales(self, choice: torch.Tensor) -> torch.Tensor:
        """Quantized factorized-prior scales of ẑ for each token's expert: (n_c, Dz) float64."""
        table = torch.stack([quantize_scale(expert.z_log_scale.double().exp()) for expert in self.experts])
        return table[choice]

    @torch.no_grad()
    def coding_params(self, z_hat: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantized tables the coder uses, computed identically on both sides from integers only:
        z's prior scales (n_c, Dz), y's means (n_c, D) and scales (n_c, D), all float64."""
        means = torch.zeros(len(choice), self.cfg.latent, dtype=torch.float64)
        scales = torch.zeros(len(choice), self.cfg.latent, dtype=torch.float64)
        for e, rows in self._groups(choice):
            # In float64, the tokens of one expert as one batch (module docstring: snapped to tables).
            net = self.experts[e].hyper_synthesis
            h = z_hat[rows].double()
            h = nn.functional.gelu(nn.functional.linear(h, net[0].weight.double(), net[0].bias.double()))
            h = nn.functional.linear(h, net[2].weight.double(), net[2].bias.double())
            mean, raw = h.chunk(2, dim=-1)
            means[rows] = quantize_mean(mean)
            scales[rows] = quantize_scale(nn.functional.softplus(raw))
        return self.z_prior_scales(choice), means, scales

    @torch.no_grad()
    def to_symbols(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merged tokens (n_c, C) → (router choices (n_c,), ẑ (n_c, Dz), y symbols (n_c, D)), int64."""
        return self.symbols_and_tables(x)[:3]

    @torch.no_grad()
    def symbols_and_tables(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`to_symbols` plus the coding tables it built on the way: (choice, ẑ, symbols, z's
        prior scales, y's scales), so the encoder computes them once."""
        x = x.float()
        choice = self.choose_experts(x)
        y = self.analysis(x)
        z_hat = self.hyper_symbols(y, choice)
        z_scales, means, scales = self.coding_params(z_hat, choice)
        symbols = torch.round(y.double() - means).long().clamp(-SYMBOL_MAX, SYMBOL_MAX)
        return choice, z_hat, symbols, z_scales, scales

    @torch.no_grad()
    def from_symbols(self, choice: torch.Tensor, z_hat: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
        """The decoder's reconstruction x̂ = g_s(μ + s), (n_c, C) float32."""
        _, means, _ = self.coding_params(z_hat, choice)
        return self.synthesis((means + symbols.double()).float())

    @torch.no_grad()
    def estimated_bits(self, choice: torch.Tensor, z_hat: torch.Tensor, symbols: torch.Tensor) -> float:
        """The model's rate of one image's symbols with the quantized tables: Σ −log2 P + router bits."""
        z_scales, _, scales = self.coding_params(z_hat, choice)
        return self.bits_with_tables(z_hat, symbols, z_scales, scales, len(choice))

    def bits_with_tables(self, z_hat: torch.Tensor, symbols: torch.Tensor, z_scales: torch.Tensor,
                         scales: torch.Tensor, n_tokens: int) -> float:
        """:meth:`estimated_bits` given the tables :meth:`coding_params` already computed."""
        bits = laplace_bits(z_hat.double(), z_scales).sum() + laplace_bits(symbols.double(), scales).sum()
        return float(bits) + self.route_bits() * n_tokens
