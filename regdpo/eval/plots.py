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


def plot_sample_frames(samples: list[dict[str, Any]], out: Path, num_frames_shown: int = 4) -> Path:
    """A contact sheet: per held-out clip, rows real / base / tuned, a few frames across time."""
    rows = [(s["clip_id"], name, s["videos"][name]) for s in samples for name in ("real", "base", "tuned")]
    cols = min(num_frames_shown, len(rows[0][2]))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 1.8 * len(rows)), squeeze=False)
    for r, (clip_id, name, frames) in enumerate(rows):
        picks = [round(i * (len(frames) - 1) / max(cols - 1, 1)) for i in range(cols)]
        for c, k in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(frames[k])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{clip_id[:8]}\n{name}", fontsize=8)
            if r == 0:
                ax.set_title(f"frame {k}", fontsize=8)
    fig.suptitle("held-out clips: real vs base vs tuned (same seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
