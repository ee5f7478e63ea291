"""summarize(): per-pair changes, intervals and verdicts from pair_errors rows."""

import numpy as np
import pytest

from regdpo.eval.metrics import summarize


def rows_for(num_pairs, *, real_change, neg_change, ts=(0.3, 0.7), seed=0, noise=0.01):
    """Synthetic pair_errors rows: tuned = base + change (+ small noise) on real and negative."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        for t in ts:
            bw, bl = 1.0 + rng.uniform(0, 0.2), 1.0 + rng.uniform(0, 0.2)
            rows.append({"key": f"p{i}", "t": t, "err_base_w": bw, "err_base_l": bl,
                         "err_tuned_w": bw + real_change + noise * rng.normal(),
                         "err_tuned_l": bl + neg_change + noise * rng.normal()})
    return rows


def _by_metric(summary):
    return {v["metric"]: v for v in summary["verdicts"]}


def test_clear_improvement_on_real_clips_is_better_and_a_falling_lose_gap_is_worse():
    s = summarize(rows_for(12, real_change=-0.2, neg_change=-0.1))
    v = _by_metric(s)
    assert v["denoise_error_real"]["verdict"] == "better"
    assert v["denoise_error_real"]["change"] == pytest.approx(s["win_gap"])
    assert v["denoise_error_negative"]["verdict"] == "worse"  # lose gap < 0: the wrong way
    assert v["s"]["verdict"] == "better" and s["s"] == pytest.approx(-0.1, abs=0.02)
    assert v["implicit_acc"]["tuned"] == 1.0 and v["implicit_acc"]["verdict"] == "better"
    assert all(r["interval"]["n"] == 12 for r in s["verdicts"])


def test_no_change_gives_no_measurable_change():
    v = _by_metric(summarize(rows_for(12, real_change=0.0, neg_change=0.0, noise=0.05)))
    assert v["denoise_error_real"]["verdict"] == "no measurable change"
    assert v["s"]["verdict"] == "no measurable change"


def test_two_pairs_keep_the_demo_honest():
    """The demo's numbers: both gaps fall together by ~0.46, s ~ -7e-4. The margin of two pairs
    must not be declared a win."""
    rows = rows_for(2, real_change=-0.4583, neg_change=-0.4576, noise=0.0005, ts=(0.1, 0.3, 0.5, 0.7, 0.9))
    s = summarize(rows)
    v = _by_metric(s)
    assert s["num_pairs"] == 2
    assert v["s"]["verdict"] == "no measurable change"
    assert v["s"]["interval"]["low"] < 0 < v["s"]["interval"]["high"]


def test_per_timestep_curves_on_real_and_negative():
    s = summarize(rows_for(4, real_change=-0.1, neg_change=0.05, ts=(0.1, 0.5, 0.9)))
    assert [r["t"] for r in s["per_timestep"]] == [0.1, 0.5, 0.9]
    for r in s["per_timestep"]:
        assert r["real"]["change"]["estimate"] == pytest.approx(-0.1, abs=0.03)
        assert r["negative"]["change"]["estimate"] == pytest.approx(0.05, abs=0.03)
    assert set(s["denoise_error_negative"]["per_t"]["tuned"]) == {"0.1", "0.5", "0.9"}


def test_incomplete_or_empty_rows_are_refused():
    rows = rows_for(2, real_change=0, neg_change=0)
    with pytest.raises(ValueError, match="every pair needs every timestep"):
        summarize(rows[:-1] + [{**rows[-1], "t": 0.123}])
    with pytest.raises(ValueError, match="heldout split is empty"):
        summarize([])


def test_implicit_accuracy_of_two_pairs_is_not_a_win_even_when_both_agree():
    v = _by_metric(summarize(rows_for(2, real_change=-0.3, neg_change=0.3, noise=0.0)))
    assert v["implicit_acc"]["tuned"] == 1.0
    assert v["implicit_acc"]["verdict"] == "no measurable change"  # 2 of 2 is [0.16, 1] at 95%
    assert _by_metric(summarize(rows_for(12, real_change=-0.3, neg_change=0.3)))["implicit_acc"]["verdict"] == "better"
