"""Paired bootstrap intervals and verdicts (regdpo/eval/stats.py)."""

import math

import numpy as np
import pytest

from regdpo.eval.stats import BETTER, SAME, WORSE, Interval, mean_interval, set_interval, verdict


def _iv(lo, hi):
    return Interval((lo + hi) / 2, lo, hi, 5, 0.95, "test")


@pytest.mark.parametrize("lo,hi,better,expected", [
    (-2, -1, "lower", BETTER), (-2, -1, "higher", WORSE), (1, 2, "lower", WORSE), (1, 2, "higher", BETTER),
    (-1, 1, "lower", SAME), (-1, 1, "higher", SAME), (0, 1, "higher", SAME),  # touching 0 is not excluding it
])
def test_verdict_follows_the_side_of_zero_and_the_wanted_direction(lo, hi, better, expected):
    assert verdict(_iv(lo, hi), better=better) == expected


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="lower"):
        verdict(_iv(1, 2), better="up")


def test_two_pairs_give_an_honestly_wide_interval():
    # Two pairs that agree closely: a percentile bootstrap alone would return [-0.47, -0.45].
    iv = mean_interval([-0.45, -0.47], seed=0)
    assert iv.n == 2
    half_t = 12.706 * np.std([-0.45, -0.47], ddof=1) / math.sqrt(2)  # t(0.975, 1 df)
    assert iv.low == pytest.approx(-0.46 - half_t, rel=1e-3) and iv.high == pytest.approx(-0.46 + half_t, rel=1e-3)
    assert "Student-t" in iv.method


def test_one_pair_has_no_interval_and_no_verdict():
    iv = mean_interval([-3.0])
    assert math.isinf(iv.low) and math.isinf(iv.high) and "1 pair" in iv.note
    assert verdict(iv, better="lower") == SAME


@pytest.mark.parametrize("n", [2, 3, 5])
def test_small_sample_intervals_cover_the_true_mean(n):
    """Coverage of the stated 95% over many small data sets from N(0, 1): a percentile bootstrap
    alone covers about 50% of the time at n = 2 and about 80% at n = 5."""
    rng = np.random.default_rng(1)
    trials = 300
    covered = sum(
        (lambda iv: iv.low <= 0.0 <= iv.high)(mean_interval(rng.normal(size=n), num_resamples=300, seed=i))
        for i in range(trials))
    assert covered / trials >= 0.92


def test_many_pairs_match_the_normal_interval_and_are_seeded():
    x = np.random.default_rng(0).normal(0.3, 1.0, size=400)
    iv = mean_interval(x, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert iv.high - iv.low == pytest.approx(2 * half, rel=0.1)
    assert mean_interval(x, seed=3) == iv
    assert verdict(iv, better="higher") == BETTER


def test_mean_interval_rejects_empty_and_non_finite_input():
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])


def test_set_interval_needs_enough_units_and_resamples_them_jointly():
    few = set_interval(lambda idx: float(len(idx)), 3, min_sets=5)
    assert math.isinf(few.low) and "at least 5" in few.note

    a = np.arange(20.0)
    b = a + 1.0  # b - a is 1 for every unit: a paired resample must give exactly 1 every time
    iv = set_interval(lambda idx: float(b[idx].mean() - a[idx].mean()), 20, min_sets=5, num_resamples=200)
    assert iv.low == pytest.approx(1.0) and iv.high == pytest.approx(1.0)


def test_a_fraction_of_two_agreeing_pairs_is_not_a_verdict():
    from regdpo.eval.stats import proportion_interval, shifted

    two = proportion_interval(2, 2)
    assert two.low == pytest.approx(0.025 ** 0.5) and two.high == 1.0  # Clopper-Pearson, 2 of 2
    assert verdict(shifted(two, 0.5), better="higher") == SAME
    many = proportion_interval(12, 12)
    assert verdict(shifted(many, 0.5), better="higher") == BETTER
    assert verdict(shifted(proportion_interval(0, 12), 0.5), better="higher") == WORSE
    with pytest.raises(ValueError, match="successes"):
        proportion_interval(3, 2)
