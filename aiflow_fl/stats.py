"""Uncertainty of held-out figures: a paired cluster bootstrap of the change after − before.

A held-out figure such as next-token accuracy is a ratio over tokens, ``Σ correct / Σ tokens``, but
the tokens of one chunk are not independent (a chunk is one passage of one domain), so resampling
single tokens would understate the uncertainty. The unit resampled here is the **chunk**, and the
same resampled chunks are used for *before* and *after* (both evaluations saw the very same chunks),
which is what makes the interval of the difference much narrower than the two separate intervals:

    for b = 1..B:  draw n chunk indices I_b uniformly with replacement
                   δ_b = Σ_{i∈I_b} after_i / Σ_{i∈I_b} tokens_i − Σ_{i∈I_b} before_i / Σ_{i∈I_b} tokens_i
    interval = the (1−level)/2 and (1+level)/2 empirical quantiles of δ_1..δ_B   (percentile method)

(Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13; the cluster/block resampling
of dependent units, Davison & Hinkley 1997, §3.8.) A change is "beyond noise" at that level when the
interval excludes 0. Pure numpy: no model, no file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aiflow_fl.errors import AiflowError


@dataclass(frozen=True)
class DeltaInterval:
    """after − before of a ratio statistic over chunks, with its bootstrap interval."""

    before: float
    after: float
    delta: float
    low: float
    high: float
    level: float
    chunks: int
    tokens: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def paired_bootstrap_delta(
    before: np.ndarray,
    after: np.ndarray,
    tokens: np.ndarray,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> DeltaInterval:
    """Percentile interval of ``Σafter/Σtokens − Σbefore/Σtokens`` by resampling chunks (module doc).

    ``before``/``after``: per-chunk sums of the statistic's numerator (e.g. correct predictions or
    summed negative log-likelihood) of the same chunks, ``tokens``: predicted tokens per chunk.
    """
    before, after, tokens = (np.asarray(x, dtype=np.float64) for x in (before, after, tokens))
    if before.ndim != 1 or before.shape != after.shape or before.shape != tokens.shape:
        raise AiflowError(
            f"paired bootstrap needs three 1-D arrays of the same length (one entry per held-out chunk); got shapes "
            f"{before.shape}, {after.shape}, {tokens.shape}."
        )
    if before.size < 2:
        raise AiflowError(f"paired bootstrap needs at least 2 held-out chunks; got {before.size}.")
    if not 0.0 < level < 1.0:
        raise AiflowError(f"bootstrap level is {level}; it must be strictly between 0 and 1 (e.g. 0.95).")
    if n_resamples < 100:
        raise AiflowError(f"n_resamples is {n_resamples}; use at least 100 (2000 is the default).")
    if np.any(tokens <= 0):
        raise AiflowError("every held-out chunk must predict at least one token (tokens > 0).")
    n = before.size
    rng = np.random.default_rng(seed)
    diff = after - before
    deltas = np.empty(n_resamples)
    # Resample in blocks so memory stays O(block · n) for any number of resamples.
    block = max(1, min(n_resamples, 2_000_000 // n))
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        index = rng.integers(0, n, size=(stop - start, n))
        deltas[start:stop] = diff[index].sum(axis=1) / tokens[index].sum(axis=1)
    low, high = np.quantile(deltas, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    total = tokens.sum()
    return DeltaInterval(
        before=float(before.sum() / total), after=float(after.sum() / total), delta=float(diff.sum() / total),
        low=float(low), high=float(high), level=level, chunks=n, tokens=int(total),
    )
