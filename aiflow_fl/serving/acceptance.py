"""Acceptance rules of speculative decoding: pure tensor math, no models, no I/O.

A verifier with next-token distribution ``p`` checks draft tokens ``x_1..x_n`` proposed from a
distribution ``q`` (AI Flow paper §II-B2, ANCHORS.md §3; Leviathan et al. 2023, Chen et al. 2023):

* **greedy**: accept the longest prefix where ``x_i == argmax p_i``; the first disagreeing position
  gets the verifier's own argmax instead. The output is exactly greedy decoding of the verifier.
* **sampling**: accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; on the first rejection
  sample a replacement from ``norm(max(0, p_i − q_i))``. Each output token is then distributed
  exactly as ``p_i`` given its prefix, whatever ``q`` is (``q`` may even be zero outside a reduced
  draft vocabulary).

Both return ``(n_accepted, next_token)``: ``next_token`` is the replacement after a rejection, or
the verifier's bonus token after ``x_n`` when its distribution there is known, else ``None``.
"""

from __future__ import annotations

import torch

from aiflow_fl.errors import AiflowError


def greedy_accept(draft: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int | None]:
    """Longest prefix of ``draft`` (n,) equal to ``target_argmax`` (n or n+1,); see module docstring.

    ``target_argmax[i]`` is the verifier's choice for the position of ``draft[i]``; an (n+1)-th entry
    is its choice after the whole draft (the bonus token).
    """
    n = draft.numel()
    if target_argmax.numel() not in (n, n + 1):
        raise AiflowError(f"greedy_accept: {target_argmax.numel()} verifier tokens for {n} draft tokens; need n or n+1.")
    mismatch = (draft != target_argmax[:n]).nonzero()
    accepted = int(mismatch[0, 0]) if mismatch.numel() else n
    if accepted < n or target_argmax.numel() == n + 1:
        return accepted, int(target_argmax[accepted])
    return accepted, None


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p − q))``, the distribution to resample from after a rejection.

    When ``p ≤ q`` everywhere (only possible if p == q up to rounding, where a rejection has
    probability ~0) the residual is empty and ``p`` itself is returned.
    """
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return residual / total if total > 0 else p


def speculative_accept(
    draft: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int | None]:
    """Speculative sampling over a block (module docstring).

    ``draft`` (n,) tokens, ``draft_probs`` (n, V) the proposal distributions ``q_i`` they were drawn
    from, ``target_probs`` (n or n+1, V) the verifier's ``p_i`` (row n, if present, is the bonus
    distribution after the block).
    """
    n = draft.numel()
    if draft_probs.shape[0] != n or target_probs.shape[0] not in (n, n + 1):
        raise AiflowError(
            f"speculative_accept: {n} draft tokens need {n} draft distributions (got {draft_probs.shape[0]}) "
            f"and n or n+1 verifier distributions (got {target_probs.shape[0]})."
        )
    for i in range(n):
        token = int(draft[i])
        p, q = target_probs[i, token], draft_probs[i, token]
        # u < p/q  <=>  u*q < p, which also handles q == 0 (token outside the draft's support).
        u = torch.rand((), generator=generator, dtype=torch.float64)
        if not u * q < p:
            replacement = torch.multinomial(residual_distribution(target_probs[i], draft_probs[i]), 1, generator=generator)
            return i, int(replacement)
    if target_probs.shape[0] == n + 1:
        return n, int(torch.multinomial(target_probs[n], 1, generator=generator))
    return n, None


def probs_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at a temperature, in float32 (what both draft and verifier sample from)."""
    if temperature <= 0:
        raise AiflowError(f"temperature must be > 0 for sampling (got {temperature}); use greedy decoding for 0.")
    return torch.softmax(logits.float() / temperature, dim=-1)


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    """Expected tokens per verifier call with i.i.d. acceptance α: (1 − α^{γ+1}) / (1 − α)."""
    if acceptance >= 1.0:
        return float(draft_len + 1)
    return (1 - acceptance ** (draft_len + 1)) / (1 - acceptance)


def next_draft_len(current: int, accepted: int, drafted: int, lowest: int, highest: int) -> int:
    """Adaptive draft length (as transformers' "heuristic" schedule): +2 after a fully accepted
    draft, −1 after a rejection, kept within [lowest, highest]."""
    step = 2 if accepted == drafted else -1
    return max(lowest, min(highest, current + step))
