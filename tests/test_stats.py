"""The paired chunk bootstrap of after − before (aiflow_fl.stats) against scipy's own bootstrap."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from aiflow_fl.errors import AiflowError
from aiflow_fl.stats import paired_bootstrap_delta


def _chunks(n: int, p_before: float, p_after: float, seed: int = 0, tokens: int = 63):
    """Correct-prediction counts of n chunks, correlated within a chunk (a per-chunk difficulty)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 0.8, size=n)
    logistic = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    base = np.log(p_before / (1 - p_before))
    gain = np.log(p_after / (1 - p_after)) - base
    before = rng.binomial(tokens, logistic(base + difficulty))
    after = rng.binomial(tokens, logistic(base + gain + difficulty))
    return before.astype(float), after.astype(float), np.full(n, float(tokens))


def test_interval_matches_scipy_paired_percentile_bootstrap():
    before, after, tokens = _chunks(300, 0.16, 0.19, seed=1)
    ours = paired_bootstrap_delta(before, after, tokens, n_resamples=4000, seed=3)

    def delta(b, a, t, axis=-1):
        return a.sum(axis) / t.sum(axis) - b.sum(axis) / t.sum(axis)

    ref = scipy_stats.bootstrap((before, after, tokens), delta, paired=True, vectorized=True, n_resamples=4000,
                                method="percentile", confidence_level=0.95, random_state=np.random.default_rng(5))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.delta == pytest.approx(delta(before, after, tokens))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.08 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.08 * width)
    assert ours.before == pytest.approx(before.sum() / tokens.sum())
    assert ours.after == pytest.approx(after.sum() / tokens.sum())
    assert ours.chunks == 300 and ours.tokens == 300 * 63


def test_pairing_makes_the_interval_narrower_than_unpaired():
    before, after, tokens = _chunks(200, 0.2, 0.22, seed=2)
    paired = paired_bootstrap_delta(before, after, tokens, seed=0)
    rng = np.random.default_rng(0)  # unpaired: before and after resampled independently
    deltas = []
    for _ in range(2000):
        i, j = rng.integers(0, 200, 200), rng.integers(0, 200, 200)
        deltas.append(after[j].sum() / tokens[j].sum() - before[i].sum() / tokens[i].sum())
    low, high = np.quantile(deltas, [0.025, 0.975])
    assert paired.half_width < 0.6 * (high - low) / 2


def test_no_change_gives_zero_interval_and_a_clear_gain_excludes_zero():
    before, _, tokens = _chunks(50, 0.3, 0.3)
    same = paired_bootstrap_delta(before, before, tokens)
    assert same.low == same.high == same.delta == 0.0 and not same.excludes_zero
    before, after, tokens = _chunks(400, 0.15, 0.25, seed=4)
    gain = paired_bootstrap_delta(before, after, tokens)
    assert gain.excludes_zero and gain.low < gain.delta < gain.high


def test_coverage_is_near_the_level():
    """Over repeated held-out draws the 95 % interval covers the true gain about 95 % of the time."""
    truth_before, truth_after, tokens = _chunks(20000, 0.2, 0.23, seed=9)
    true_delta = (truth_after.sum() - truth_before.sum()) / tokens.sum()
    rng = np.random.default_rng(11)
    covered = 0
    trials = 60
    for t in range(trials):
        pick = rng.integers(0, 20000, 150)
        ci = paired_bootstrap_delta(truth_before[pick], truth_after[pick], tokens[pick], n_resamples=500, seed=t)
        covered += ci.low <= true_delta <= ci.high
    assert covered / trials >= 0.85


@pytest.mark.parametrize("args, message", [
    ((np.ones(3), np.ones(4), np.ones(3)), "same length"),
    ((np.ones(1), np.ones(1), np.ones(1)), "at least 2"),
    ((np.ones(3), np.ones(3), np.zeros(3)), "at least one token"),
])
def test_bad_input_names_the_problem(args, message):
    with pytest.raises(AiflowError, match=message):
        paired_bootstrap_delta(*args)
