"""PNG plots for the report: training curves and the held-out margin and errors per timestep.

Curves are drawn as an exponential moving average (bold) over the raw values (faint). Series
that would lie on top of each other get their own panel (win gap, lose gap) or, when they are
equal (r = DGR), one line and a note saying so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LN2 = math.log(2.0)

# (title, key, y label, reference line or None, note on the reference line)
PANELS = (
    ("total loss", "loss", "loss", None, ""),
    ("DPO loss", "dpo_loss", "-log σ(-β s)", LN2, "ln 2: policy = reference"),
    ("SFT error on the real clip", "sft_loss", "err_θ(w)", None, ""),
    ("DGR and r", "dgr", "coefficient", None, ""),
    ("margin s = win gap - lose gap", "s", "s (want < 0)", 0.0, ""),
    ("implicit accuracy", "implicit_acc", "fraction with s < 0", 0.5, "chance"),
    ("win gap (real clip)", "win_gap", "err_θ(w) - err_ref(w), want < 0", 0.0, ""),
    ("lose gap (negative)", "lose_gap", "err_θ(l) - err_ref(l), want > 0", 0.0, ""),
    ("gradient norm (before clipping)", "grad_norm", "‖g‖", None, ""),
)


def load_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """train/metrics.jsonl as a list of {key: float}, and how many lines could not be read.

    Tolerant, through the trainer's own reader (regdpo/train/observe.py): a torn last line (a
    write cut short) and, since this only shows the log, any other line that is not a JSON
    object are skipped with a warning naming the file and line, and counted; non-numeric values
    are dropped; unknown keys are kept; a missing "step" is the line's position.
    """
    from regdpo.train.observe import read_jsonl_lines

    path = Path(path)
    read = read_jsonl_lines(path, skip_bad=True)
    lines = sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip()) if path.is_file() else 0
    rows = []
    for i, raw in read:
        row = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row.setdefault("step", float(i - 1))
        rows.append(row)
    return rows, lines - len(read)


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have `key` and a finite value."""
    pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values)


def ema(values: np.ndarray, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average (the first values are not pulled toward 0).
    Default span: 1/20 of the series, at least 1 (no smoothing)."""
    values = np.asarray(values, dtype=np.float64)
    if span is None:
        span = max(1, len(values) // 20)
    alpha = 2.0 / (span + 1.0)
    out, m, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        m = (1 - alpha) * m + alpha * v
        norm = (1 - alpha) * norm + alpha
        out[i] = m / norm
    return out


def equal_series(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and len(a) > 0 and bool(np.allclose(a, b, rtol=1e-6, atol=1e-12))


def smooth(y: np.ndarray, log: bool = False) -> np.ndarray:
    """The moving average drawn over a curve; on a log axis it averages log values, so an
    exponential decay (DGR collapsing) is not drawn decades above the raw values."""
    if log and len(y) and np.all(y > 0):
        return np.exp(ema(np.log(y)))
    return ema(y)


def _draw(ax, x, y, label: str, color: str, style: str = "-", marker: str | None = None, log: bool = False) -> None:
    ax.plot(x, y, color=color, lw=0.8, alpha=0.35)
    markevery = max(1, len(x) // 12)
    ax.plot(x, smooth(y, log), color=color, lw=1.8, ls=style, marker=marker, markevery=markevery, ms=4, label=label)


def _dgr_panel(ax, rows) -> str:
    """DGR and r on one axis; returns a note for the panel (equal / zero / log scale)."""
    x, dgr = series(rows, "dgr")
    xr, r = series(rows, "r")
    notes = []
    positive = dgr[dgr > 0]
    log = bool(len(positive)) and positive.max() / positive.min() > 100
    _draw(ax, x, dgr, "DGR", "C0", log=log)
    if equal_series(dgr, r):
        notes.append("r = DGR at every step (one line)")
    elif len(r) and np.all(r == 0):
        notes.append("r = 0 at every step (not drawn)")
    elif len(r):
        _draw(ax, xr, r, "r", "C3", "--", "s", log=log)
    if log:
        ax.set_yscale("log")
        notes.append("log scale")
    return "; ".join(notes)


def plot_training_curves(rows: list[dict[str, Any]], out: str | Path, *, title: str = "training") -> Path:
    """A 3x3 grid of the metrics.jsonl curves (panels for missing keys say so)."""
    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, (name, key, ylabel, ref, ref_note) in zip(axes.flat, PANELS):
        x, y = series(rows, key)
        note = ""
        if not len(y):
            ax.text(0.5, 0.5, f"{key}: not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif key == "dgr":
            note = _dgr_panel(ax, rows)
        else:
            _draw(ax, x, y, key, "C0")
        if ref is not None and len(y):
            ax.axhline(ref, color="grey", lw=0.9, ls=":", label=ref_note or f"{ref:g}")
        ax.set_title(name + (f"\n({note})" if note else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if len(y):
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}: bold = moving average, faint = every step", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def _errorbars(interval_dicts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    est = np.array([d["estimate"] for d in interval_dicts])
    bounded = [math.isfinite(d["low"]) and math.isfinite(d["high"]) for d in interval_dicts]
    lo = np.array([d["estimate"] - d["low"] if ok else 0.0 for d, ok in zip(interval_dicts, bounded)])
    hi = np.array([d["high"] - d["estimate"] if ok else 0.0 for d, ok in zip(interval_dicts, bounded)])
    return est, np.vstack([lo, hi]), bounded


def _change_panel(ax, ts: np.ndarray, series_: list[tuple[str, list[dict[str, Any]], str, str]], title: str) -> None:
    """Changes tuned - base per timestep with their intervals; an unbounded interval is marked.
    Several series are nudged apart along t, so equal ones do not hide each other."""
    width = float(ts.max() - ts.min()) if len(ts) > 1 else 1.0
    for i, (label, intervals, color, marker) in enumerate(series_):
        est, err, bounded = _errorbars(intervals)
        x = ts + (i - (len(series_) - 1) / 2) * 0.012 * width
        ax.errorbar(x, est, yerr=err, fmt=f"{marker}-", color=color, capsize=4, label=label)
        for t, e, ok in zip(x, est, bounded):
            if not ok:
                ax.annotate("no interval", (t, e), fontsize=7, color="grey", textcoords="offset points", xytext=(3, 6))
    ax.axhline(0.0, color="grey", lw=0.9, ls=":")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("tuned - base")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_denoise_error(summary: dict[str, Any], out: str | Path) -> Path:
    """Per timestep: the margin s with its interval (top left: what preference training moves),
    its two components, the win and lose gap (top right), and the errors of base and tuned on the
    real clips and on the negatives (bottom)."""
    per_t = summary["per_timestep"]
    ts = np.array([r["t"] for r in per_t])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    if all("s" in r for r in per_t):
        _change_panel(axes[0][0], ts, [("s, interval", [r["s"] for r in per_t], "C2", "D")],
                      "margin s = win gap - lose gap (want < 0)")
    _change_panel(axes[0][1], ts, [("win gap (real), interval", [r["real"]["change"] for r in per_t], "C0", "o"),
                                   ("lose gap (negative), interval", [r["negative"]["change"] for r in per_t], "C3", "s")],
                  "its components: win gap (want < 0), lose gap (want > 0)")
    for col, member in enumerate(("real", "negative")):
        ax = axes[1][col]
        ax.plot(ts, [r[member]["base"] for r in per_t], "o-", color="C0", label="base")
        ax.plot(ts, [r[member]["tuned"] for r in per_t], "s--", color="C1", label="tuned")
        ax.set_title("denoising error on the real held-out clips" if member == "real"
                     else "denoising error on their negatives", fontsize=10)
        ax.set_ylabel("err (mean squared, per element)")
        ax.set_xlabel("t (noise level)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    n = summary["num_pairs"]
    fig.suptitle(f"held-out margin and denoising errors per timestep ({n} pair{'s' if n != 1 else ''}, same noise for "
                 "both models)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
