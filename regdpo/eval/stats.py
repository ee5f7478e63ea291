"""Confidence intervals over held-out pairs and a plain verdict per metric.

Every evaluation number compares the tuned model with its base on the same held-out pairs,
so the unit of resampling is the pair: a paired bootstrap (resample pairs with replacement,
seeded) of the per-pair change.

Few pairs are the normal case on a laptop (the demo holds out 2), and a percentile bootstrap
over n pairs is too narrow for small n: with 2 pairs it can only return the range of the two
values. So an interval for a mean is never narrower than the Student-t interval over the same
per-pair values (exact under normality, very wide for n = 2: t(0.975, 1 df) = 12.7). For large
n the two agree. A statistic of a whole set (the Fréchet distance) has no t-interval; below
`min_sets` clips it gets no interval and no verdict rather than a falsely tight one.

Verdict: "better" / "worse" when the interval excludes the no-change value on the side the
metric wants / does not want, "no measurable change" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

BETTER, WORSE, SAME = "better", "worse", "no measurable change"
# What a verdict row is to the report's headline (headline.py): the preference margin and its
# accuracy decide; the two denoising errors are the margin's components (s = win gap - lose gap),
# read for what they say about the real clips, never counted as votes of their own; any other row
# (sample metrics, scorers) measures the samples.
MARGIN, COMPONENT, SAMPLES = "margin", "component", "samples"
_ROLES = {"s": MARGIN, "implicit_acc": MARGIN, "denoise_error_real": COMPONENT, "denoise_error_negative": COMPONENT}


def role_of(row: dict) -> str:
    """A verdict row's role; rows written before roles existed get theirs from the metric name."""
    return row.get("role") or _ROLES.get(row["metric"], SAMPLES)


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval, resting on `n` resampled units."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    method: str
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(interval: Interval, *, better: Literal["lower", "higher"], null: float = 0.0) -> str:
    """Plain words from where the interval lies relative to `null` (the value meaning no change)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if interval.low > null:
        return BETTER if better == "higher" else WORSE
    if interval.high < null:
        return BETTER if better == "lower" else WORSE
    return SAME


def bootstrap_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """(num_resamples, n) indices drawn with replacement; the same seed gives the same draws, so
    metrics computed from the same pairs are resampled identically (paired across metrics)."""
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_interval(values: np.ndarray | list[float], *, num_resamples: int = 2000, confidence: float = 0.95,
                  seed: int = 0) -> Interval:
    """Interval for the mean of per-pair values (e.g. tuned - base per pair).

    Paired bootstrap percentile interval, widened to at least the Student-t interval (see the
    module docstring for why). One pair gives an unbounded interval.
    """
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        raise ValueError("mean_interval needs at least one value (no held-out pairs?)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_interval got non-finite values: {x[~np.isfinite(x)][:3]}")
    est = float(x.mean())
    if n == 1:
        return Interval(est, -math.inf, math.inf, 1, confidence, "none", "1 pair: no interval is possible")
    boot = x[bootstrap_indices(n, num_resamples, seed)].mean(axis=1)
    b_lo, b_hi = _quantiles(boot, confidence)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    lo, hi = min(b_lo, est - half), max(b_hi, est + half)
    widened = lo < b_lo or hi > b_hi
    method = "paired bootstrap" + (", widened to the Student-t interval" if widened else "")
    return Interval(est, lo, hi, n, confidence, method)


def proportion_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Clopper-Pearson (exact binomial) interval for a fraction of n independent pairs.

    For a yes/no per pair a bootstrap or t-interval collapses when every pair agrees (2 of 2
    gives [1, 1]); the exact interval does not (2 of 2 gives [0.16, 1] at 95%).
    """
    from scipy.stats import beta

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"proportion_interval needs 0 <= successes <= n, n > 0; got {successes} of {n}")
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return Interval(successes / n, lo, hi, n, confidence, "exact binomial (Clopper-Pearson)")


def shifted(interval: Interval, by: float) -> Interval:
    """The same interval for value - `by` (e.g. an accuracy as its change from chance)."""
    return Interval(interval.estimate - by, interval.low - by, interval.high - by, interval.n, interval.confidence,
                    interval.method, interval.note)


def set_interval(statistic: Callable[[np.ndarray], float], n: int, *, num_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0, min_sets: int = 5, unit: str = "clips") -> Interval:
    """Interval for a statistic of a whole set of n paired units, `statistic(indices)`.

    `statistic` receives an index array into the n units (the identity for the estimate,
    resampled indices for the bootstrap) and must compute every compared quantity on the same
    indices, which is what makes the bootstrap paired.
    """
    if n == 0:
        raise ValueError(f"set_interval needs at least one unit (no {unit})")
    est = float(statistic(np.arange(n)))
    if n < min_sets:
        return Interval(est, -math.inf, math.inf, n, confidence, "none",
                        f"{n} {unit}: an interval on a set statistic needs at least {min_sets}")
    boot = np.array([statistic(idx) for idx in bootstrap_indices(n, num_resamples, seed)])
    boot = boot[np.isfinite(boot)]
    if len(boot) < num_resamples // 2:
        return Interval(est, -math.inf, math.inf, n, confidence, "none", "the statistic was undefined on most resamples")
    lo, hi = _quantiles(boot, confidence)
    return Interval(est, lo, hi, n, confidence, "paired bootstrap")


def format_interval(interval: Interval, fmt: Callable[[float], str]) -> str:
    """"[lo, hi] (95%, n=2)"; an unbounded interval says why."""
    if not math.isfinite(interval.low) or not math.isfinite(interval.high):
        return f"none ({interval.note})" if interval.note else "none"
    return f"[{fmt(interval.low)}, {fmt(interval.high)}] ({interval.confidence:.0%}, n={interval.n})"
