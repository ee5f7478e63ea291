"""The experiment's table, r-sweep figure and claim checks, from the variants' workdirs.

Every number here is read from a run's train/metrics.jsonl and eval/metrics.json; "end" means
the mean over the last 10% of training steps (single steps are noisy: batches of 4 pairs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from regdpo.eval.compare import Run  # noqa: E402
from regdpo.eval.plots import series  # noqa: E402
from regdpo.eval.report import fmt, fmt_signed  # noqa: E402
from regdpo.eval.stats import Interval, format_interval  # noqa: E402

END_FRACTION = 0.1


def end(run: Run, key: str) -> float:
    """Mean of `key` over the last 10% of steps (NaN when not logged)."""
    _, y = series(run.rows, key)
    if not len(y):
        return math.nan
    return float(np.mean(y[-max(1, int(len(y) * END_FRACTION)):]))


def start(run: Run, key: str) -> float:
    _, y = series(run.rows, key)
    return float(y[0]) if len(y) else math.nan


def heldout(run: Run, metric: str) -> dict[str, Any] | None:
    return next((v for v in (run.eval or {}).get("verdicts", []) if v["metric"] == metric), None)


def _heldout_cell(run: Run, metric: str) -> str:
    v = heldout(run, metric)
    if v is None:
        return "—"
    return f"{fmt_signed(v['change'])} {format_interval(Interval(**v['interval']), fmt)} **{v['verdict']}**"


def results_table(runs: dict[str, Run]) -> list[str]:
    header = ["run", "setting", "DGR end", "r end", "s end", "win gap end", "lose gap end", "implicit acc end",
              "held-out real-clip error change", "held-out negative error change", "held-out s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in runs.items():
        cells = [name, run.setting, fmt(end(run, "dgr")), fmt(end(run, "r")), fmt(end(run, "s")),
                 fmt(end(run, "win_gap")), fmt(end(run, "lose_gap")), fmt(end(run, "implicit_acc")),
                 _heldout_cell(run, "denoise_error_real"), _heldout_cell(run, "denoise_error_negative"),
                 _heldout_cell(run, "s")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _overlap(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return False
    return not (a["interval"]["high"] < b["interval"]["low"] or b["interval"]["high"] < a["interval"]["low"])


def claims(runs: dict[str, Run], beta: float) -> list[tuple[str, str, str]]:
    """(METHOD.md's claim, what was measured, holds / partly / does not hold), for the claims
    whose runs are present."""
    out: list[tuple[str, str, str]] = []
    wg = {n: end(r, "win_gap") for n, r in runs.items()}
    real = {n: heldout(r, "denoise_error_real") for n, r in runs.items()}

    if "dpo" in runs:
        d = end(runs["dpo"], "dgr")
        out.append(("DPO: DGR collapses once s goes negative (β/2 at the start)",
                    f"DGR {fmt(start(runs['dpo'], 'dgr'))} at step 0, {fmt(d)} at the end; s end {fmt(end(runs['dpo'], 's'))}",
                    "holds" if d < 0.01 * beta / 2 else "does not hold"))
        s = end(runs["dpo"], "s")
        out.append(("DPO 'cheats': the win gap turns positive while s still falls",
                    f"train win gap end {fmt(wg['dpo'])}, lose gap end {fmt(end(runs['dpo'], 'lose_gap'))}, s end "
                    f"{fmt(s)}; held-out real-clip error {real['dpo']['verdict'] if real['dpo'] else 'not evaluated'}",
                    "holds" if wg["dpo"] > 0 and s < 0 else "does not hold"))
    if "reg-dpo" in runs:
        at = {n: wg[n] for n in ("reg-dpo", "reg-dpo-2dgr") if n in runs}
        negative = [n for n, w in at.items() if w < 0]
        verdict = "holds" if len(negative) == len(at) else ("partly" if negative else "does not hold")
        lose = "; lose gap end " + ", ".join(f"{n} {fmt(end(runs[n], 'lose_gap'))}" for n in ("dpo", *at) if n in runs)
        out.append(("r ≥ DGR turns the win gap negative and stops the lose gap's runaway",
                    "train win gap end " + ", ".join(f"{n} {fmt(w)}" for n, w in at.items()) + lose
                    + f"; DGR end at r = DGR: {fmt(end(runs['reg-dpo'], 'dgr'))}", verdict))
    if "reg-dpo-dgr/5" in runs:
        ref = [n for n in ("reg-dpo",) if n in runs]
        worse = wg["reg-dpo-dgr/5"] > 0 and all(wg["reg-dpo-dgr/5"] > wg[n] for n in ref)
        out.append(("r ≪ DGR is not enough (r = DGR/5)",
                    f"train win gap end: DGR/5 {fmt(wg['reg-dpo-dgr/5'])}"
                    + "".join(f", {n} {fmt(wg[n])}" for n in ("dpo", "reg-dpo") if n in runs),
                    "holds" if worse else "does not hold"))
    big = [n for n in ("reg-dpo-r50", "reg-dpo-r500") if n in runs]
    if len(big) == 2:
        a, b = big
        same = _overlap(real[a], real[b])
        harm = end(runs[b], "s") >= 0 or (heldout(runs[b], "s") or {}).get("verdict") == "worse"
        out.append(("r ≫ DGR saturates: no further gain, no harm (r = 50 vs r = 500, both ≫ DGR at the end)",
                    f"train win gap end {fmt(wg[a])} vs {fmt(wg[b])}; held-out real-clip change "
                    f"{fmt(real[a]['change'] if real[a] else None)} vs {fmt(real[b]['change'] if real[b] else None)} "
                    f"(intervals {'overlap' if same else 'do not overlap'}); s end {fmt(end(runs[a], 's'))} vs "
                    f"{fmt(end(runs[b], 's'))}", "holds" if same and not harm else "does not hold"))
    consts = [n for n in runs if runs[n].train_cfg.get("r_mode") == "constant"
              and runs[n].train_cfg.get("objective") == "reg-dpo"]
    if consts:
        parts = [f"{n}: DGR end {fmt(end(runs[n], 'dgr'))}, r end {fmt(end(runs[n], 'r'))}, win gap end {fmt(wg[n])}"
                 for n in consts]
        out.append(("The SFT term does not die with DGR (a constant r keeps the win gap negative)", "; ".join(parts),
                    "holds" if all(wg[n] < 0 for n in consts) else "does not hold"))
    return out


ORDER = ("dpo", "reg-dpo-dgr/5", "reg-dpo-dgr/2", "reg-dpo", "reg-dpo-2dgr", "reg-dpo-r50", "reg-dpo-r500", "sft")


def plot_r_sweep(runs: dict[str, Run], out: Path) -> Path:
    """Left: the win and lose gap at the end of training per r setting. Right: the held-out
    real-clip error change (tuned - base) with its interval."""
    names = [n for n in ORDER if n in runs] + [n for n in runs if n not in ORDER]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    # markers only: the settings are categories, not points on one axis
    a.plot(x - 0.08, [end(runs[n], "win_gap") for n in names], "o", ms=8, label="win gap (want < 0)")
    a.plot(x + 0.08, [end(runs[n], "lose_gap") for n in names], "s", ms=8, label="lose gap (want > 0)")
    for i, n in enumerate(names):
        if math.isnan(end(runs[n], "win_gap")):
            a.annotate("not logged", (i, 0), fontsize=7, color="grey", ha="center", xytext=(0, 8),
                       textcoords="offset points")
    a.axhline(0, color="grey", lw=0.8, ls=":")
    a.set_title(f"end of training (mean of the last {END_FRACTION:.0%} of steps)", fontsize=10)
    est, lo, hi = [], [], []
    for n in names:
        v = heldout(runs[n], "denoise_error_real")
        iv = v["interval"] if v else {"low": math.nan, "high": math.nan}
        e = v["change"] if v else math.nan
        est.append(e)
        ok = math.isfinite(iv["low"]) and math.isfinite(iv["high"])
        lo.append(e - iv["low"] if ok else 0.0)
        hi.append(iv["high"] - e if ok else 0.0)
    b.errorbar(x, est, yerr=[lo, hi], fmt="D", capsize=5, color="C2")
    b.axhline(0, color="grey", lw=0.8, ls=":")
    b.set_title("held-out real-clip denoising error: tuned - base, 95% interval (want < 0)", fontsize=10)
    for ax in (a, b):
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("r sweep: same data, seeds and β; r = k·DGR or a constant", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
