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


# ---------------------------------------------------------------- cost-aware draft length
# With i.i.d. per-token acceptance α (Leviathan et al. 2023, §3.1), a round that drafts k tokens and
# verifies them in one forward yields 1 + α(1 − α^k)/(1 − α) = (1 − α^{k+1})/(1 − α) tokens (the
# accepted prefix plus the verifier's correction or bonus token) and costs k·c_draft + V(k).
# A verifier that resumes from the draft's hidden states (familial reuse) has no hidden state for
# the last draft token yet, so it checks k positions without a bonus token: (1 − α^k)/(1 − α) tokens.
# Drafting nothing (k = 0) means the verifier decodes alone: one token per ``solo`` seconds.
# The best k maximises tokens / second.


def expected_accepted(acceptance: float, draft_len: int) -> float:
    """Expected accepted draft tokens per round, α(1 − α^k)/(1 − α) (k when α = 1)."""
    if not 0.0 <= acceptance <= 1.0 or draft_len < 0:
        raise AiflowError(f"expected_accepted needs 0 ≤ α ≤ 1 and k ≥ 0 (got α={acceptance}, k={draft_len}).")
    if acceptance >= 1.0:
        return float(draft_len)
    return acceptance * (1 - acceptance ** draft_len) / (1 - acceptance)


def tokens_per_round(acceptance: float, draft_len: int, bonus: bool = True) -> float:
    """Expected tokens a round yields (module comment): 1 + α(1 − α^k)/(1 − α) with a bonus
    token, (1 − α^k)/(1 − α) = that − α^k without (familial reuse)."""
    with_bonus = 1.0 + expected_accepted(acceptance, draft_len)
    return with_bonus if bonus else with_bonus - acceptance ** draft_len


def draft_speed(acceptance: float, draft_len: int, draft_s: float, verify_s: list[float], solo_s: float,
                bonus: bool = True) -> float:
    """Expected tokens per second of a round drafting ``draft_len`` tokens (module comment).

    ``draft_s``: the device's time per drafted token; ``verify_s[k]``: the verifier's time for a
    block of k drafted tokens (index 0 unused); ``solo_s``: time per token with no draft.
    """
    if draft_len == 0:
        return 1.0 / solo_s
    if not 1 <= draft_len < len(verify_s):
        raise AiflowError(f"No verification cost known for a draft of {draft_len} (known: 1..{len(verify_s) - 1}).")
    return tokens_per_round(acceptance, draft_len, bonus) / (draft_len * draft_s + verify_s[draft_len])


def best_draft_len(acceptance: float, draft_s: float, verify_s: list[float], solo_s: float,
                   bonus: bool = True, lowest: int = 0) -> tuple[int, float]:
    """The draft length in ``lowest``..len(verify_s)-1 with the highest :func:`draft_speed` (the
    shorter one on ties), and that speed in tokens/s."""
    speeds = {k: draft_speed(acceptance, k, draft_s, verify_s, solo_s, bonus) for k in range(lowest, len(verify_s))}
    best = max(speeds, key=lambda k: (speeds[k], -k))
    return best, speeds[best]


def required_acceptance(speedup: float, draft_s: float, verify_s: list[float], target_s: float,
                        bonus: bool = True) -> float | None:
    """The smallest per-token acceptance α at which some draft length k ≥ 1 reaches ``speedup`` × the
    target alone (one token per ``target_s``), under these costs; None when even α = 1 cannot
    (then tokens(1, k)·target_s / (k·draft_s + V(k)) < speedup for every k)."""
    def best(alpha: float) -> float:
        return max(draft_speed(alpha, k, draft_s, verify_s, target_s, bonus) for k in range(1, len(verify_s))) * target_s

    if best(1.0) < speedup:
        return None
    lo, hi = 0.0, 1.0  # best() grows with α: bisection
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if best(mid) < speedup else (lo, mid)
    return hi


def verify_costs(samples: list[tuple[int, float]], max_len: int) -> list[float]:
    """V(1..max_len) from measured (block length, seconds) verification forwards: a least-squares line
    V(k) = a + b·k (b ≥ 0) when ≥ 2 lengths were seen, else the mean (forwards here are dominated by
    per-op overhead, nearly flat in k). Index 0 is unused (0.0)."""
    if not samples:
        raise AiflowError("verify_costs needs at least one measured verification forward.")
    ks = [float(k) for k, _ in samples]
    ts = [t for _, t in samples]
    mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
    var = sum((k - mean_k) ** 2 for k in ks)
    slope = max(0.0, sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / var) if var > 0 else 0.0
    intercept = mean_t - slope * mean_k
    return [0.0] + [max(1e-9, intercept + slope * k) for k in range(1, max_len + 1)]
