"""The familial synthesis: token-level fusion of members' next-token distributions (pure math).

Members of one family share the tokenizer, so their next-token distributions live on the same
vocabulary and can be mixed token by token. With router weights w_i (softmax of the routing scores,
Σ w_i = 1) the fused model is the mixture

    p(x_t | x_<t) = Σ_i w_i p_i(x_t | x_<t),     log p = logsumexp_i(log w_i + log p_i),

decoded greedily (:func:`fused_greedy`), or used to score a given continuation
(:func:`fused_sequence_logprob`: Σ_t log Σ_i w_i p_i(x_t | x_<t)). Uniform weights over all members
give the *average ensemble* baseline (ANCHORS §4: a baseline that isolates routing from ensembling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch


def mixture_logprobs(logprobs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """log Σ_i w_i p_i over the last axis's rows: ``logprobs`` (k, ..., V) log-probabilities -> (..., V).

    Weights are renormalised; a zero weight drops that member."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if logprobs.shape[0] != w.numel():
        raise ValueError(f"{logprobs.shape[0]} members but {w.numel()} weights")
    if not (w >= 0).all() or w.sum() <= 0:
        raise ValueError(f"fusion weights must be >= 0 and not all zero; got {w.tolist()}")
    log_w = torch.log(w / w.sum()).to(logprobs.dtype)
    shape = (-1,) + (1,) * (logprobs.dim() - 1)
    return torch.logsumexp(logprobs + log_w.view(shape), dim=0)


def fused_sequence_logprob(token_logprobs: torch.Tensor, weights: Sequence[float]) -> float:
    """Σ_t log Σ_i w_i p_i(x_t): ``token_logprobs`` (k, T) holds each member's log p_i(x_t | x_<t)."""
    return float(mixture_logprobs(token_logprobs, weights).sum())


class StepModel(Protocol):
    """What fused decoding needs from a member: next-token log-probabilities, incrementally."""

    def begin(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities (V,) of the token after ``token_ids`` (starts a fresh stream)."""

    def advance(self, token_id: int) -> torch.Tensor:
        """Append ``token_id`` to the stream; log-probabilities (V,) of the next token."""


def fused_greedy(
    members: Sequence[StepModel],
    weights: Sequence[float],
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    parallel: Callable[[list[Callable[[], torch.Tensor]]], list[torch.Tensor]] | None = None,
) -> list[int]:
    """Greedy decoding of the mixture: argmax_x Σ_i w_i p_i(x) at every step.

    ``parallel`` runs the members' steps concurrently (a list of thunks -> their results); default
    sequential. Vocabularies may differ in padding rows only: the mixture is over the shortest."""
    run = parallel or (lambda thunks: [t() for t in thunks])
    eos = eos_token_ids or set()
    out: list[int] = []
    dists = run([lambda m=m: m.begin(list(prompt_ids)) for m in members])
    for _ in range(max_new_tokens):
        vocab = min(d.shape[-1] for d in dists)
        fused = mixture_logprobs(torch.stack([d[..., :vocab].float() for d in dists]), weights)
        token = int(fused.argmax())
        out.append(token)
        if token in eos:
            break
        dists = run([lambda m=m: m.advance(token) for m in members])
    return out


def perplexity(total_logprob: float, num_tokens: int) -> float:
    """exp(-mean log-probability per token)."""
    return math.exp(-total_logprob / max(1, num_tokens))
