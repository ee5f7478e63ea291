"""PNG plots for the report: training curves and held-out denoising error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# (title, metrics.jsonl keys, y label, reference line or None)
CURVES = (
    ("total loss", ("loss",), "loss", None),
    ("DPO loss", ("dpo_loss",), "-log σ(-β s)", 0.6931471805599453),  # log 2 where policy = reference
    ("SFT error on the real clip", ("sft_loss",), "err_θ(w)", None),
    ("DGR and r", ("dgr", "r"), "coefficient", None),
    ("win / lose gap", ("win_gap", "lose_gap"), "err(θ) - err(ref)", 0.0),
    ("margin s", ("s",), "s (want < 0)", 0.0),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_training_curves(metrics: list[dict[str, Any]], out: Path) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    steps = [m["step"] for m in metrics]
    for ax, (title, keys, ylabel, ref) in zip(axes.flat, CURVES):
        for k in keys:
            ax.plot(steps, [m[k] for m in metrics], label=k, marker="." if len(steps) < 50 else None)
        if ref is not None:
            ax.axhline(ref, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Reg-DPO training")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_denoise_error(summary: dict[str, Any], out: Path) -> Path:
    per_t = summary["denoise_error_real"]["per_t"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("base", "tuned"):
        ts = [float(t) for t in per_t[name]]
        ax.plot(ts, list(per_t[name].values()), marker="o", label=name)
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel("denoising error on real held-out clips")
    ax.set_title("held-out denoising error, base vs tuned")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
