"""docs/experiment-world/: the world experiment's results.md (setup, facts, the main table, claim
checks, time), results.json, compare.{md,csv,png}, r_sweep.png, world_score.png and the sample
sheets. Every number is read from the variants' workdirs (train/metrics.jsonl, eval/metrics.json,
eval/sample_scores.jsonl)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.analysis import claims, end, heldout, plot_r_sweep  # noqa: E402
from experiments.runs import Clock  # noqa: E402
from regdpo.eval.compare import Run, compare_runs, load_run  # noqa: E402
from regdpo.eval.report import fmt, fmt_signed  # noqa: E402
from regdpo.eval.stats import Interval, format_interval, mean_interval, verdict  # noqa: E402

SCORE = "world"
PARTS = ("caption", "motion", "consistency")


def sample_scores(run: Run) -> dict[str, dict[str, float]]:
    """{video ("real" | "base" | "tuned"): {clip_id: world score}} from eval/sample_scores.jsonl."""
    out: dict[str, dict[str, float]] = {}
    for line in (run.workdir / "eval" / "sample_scores.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["video"], {})[row["clip_id"]] = row[SCORE]
    return out


def _metric(run: Run, name: str) -> dict[str, Any]:
    return (run.eval or {})["sample_scores"]["metrics"][name]


def _iv(d: dict[str, Any]) -> str:
    iv = Interval(**d)
    return f"{fmt(iv.estimate)} {format_interval(iv, fmt).split(' (')[0]}"


def _change(d: dict[str, Any], better: str = "higher") -> str:
    iv = Interval(**d)
    return f"{fmt_signed(iv.estimate)} {format_interval(iv, fmt).split(' (')[0]} **{verdict(iv, better=better)}**"


def paired(a: dict[str, float], b: dict[str, float], seed: int = 0) -> Interval:
    """Interval of mean(a - b) over the captions both scored (same captions, same seeds)."""
    keys = sorted(set(a) & set(b))
    return mean_interval(np.array([a[k] - b[k] for k in keys]), seed=seed)


def main_table(runs: dict[str, Run], vae: dict[str, Any]) -> list[str]:
    """Base vs each variant on the world score, beside the training diagnostics; `vae`: the
    score of the held-out real clips after the VAE's encode + decode (an interval)."""
    first = next(iter(runs.values()))
    world = _metric(first, SCORE)
    header = ["run", "setting", "world score [95% CI]", "change vs base [95% CI]", "caption", "motion", "consistency",
              "DGR end", "s end", "win gap end", "lose gap end", "held-out real-clip error change"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             f"| real clips | (the ceiling) | {_iv(world['real'])} | | "
             + " | ".join(_iv(_metric(first, f"{SCORE}.{p}")["real"]) for p in PARTS) + " | | | | | |",
             f"| real clips through the VAE | (what the decoder can draw) | {_iv(vae)} | | | | | | | | | |",
             f"| base | (before tuning) | {_iv(world['base'])} | | "
             + " | ".join(_iv(_metric(first, f"{SCORE}.{p}")["base"]) for p in PARTS) + " | | | | | |"]
    for name, run in runs.items():
        w = _metric(run, SCORE)
        real = heldout(run, "denoise_error_real")
        cells = [name, run.setting, _iv(w["tuned"]), _change(w["change"]),
                 *(fmt_signed(_metric(run, f"{SCORE}.{p}")["change"]["estimate"]) for p in PARTS),
                 fmt(end(run, "dgr")), fmt(end(run, "s")), fmt(end(run, "win_gap")), fmt(end(run, "lose_gap")),
                 _change(real["interval"], "lower") if real else "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def quality_claims(runs: dict[str, Run]) -> list[tuple[str, str, str]]:
    """Sample-quality checks: does tuning make better videos, and which objective does best."""
    out = []
    scores = {n: sample_scores(r) for n, r in runs.items()}
    for name, run in runs.items():
        ch = Interval(**_metric(run, SCORE)["change"])
        out.append((f"{name} makes better videos than the base (world score)",
                    f"change {fmt_signed(ch.estimate)} {format_interval(ch, fmt)}", _holds(verdict(ch, better="higher"))))
    pairs = [("reg-dpo", "dpo"), ("reg-dpo", "sft"), ("reg-dpo-2dgr", "reg-dpo"), ("reg-dpo-r50", "reg-dpo")]
    for a, b in pairs:
        if a in scores and b in scores:
            iv = paired(scores[a]["tuned"], scores[b]["tuned"])
            out.append((f"{a} makes better videos than {b} (same captions and seeds)",
                        f"difference {fmt_signed(iv.estimate)} {format_interval(iv, fmt)}",
                        _holds(verdict(iv, better="higher"))))
    return out


def _holds(v: str) -> str:
    return {"better": "holds", "worse": "the opposite holds"}.get(v, "no measurable difference")


def plot_scores(runs: dict[str, Run], out: Path) -> Path:
    """World score (and its parts) of real clips, base and every variant, with 95% intervals."""
    first = next(iter(runs.values()))
    rows = [("real clips", "real", first), ("base", "base", first)] + [(n, "tuned", r) for n, r in runs.items()]
    fig, axes = plt.subplots(1, 1 + len(PARTS), figsize=(16, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, metric in zip(axes, (SCORE, *(f"{SCORE}.{p}" for p in PARTS))):
        est, lo, hi = [], [], []
        for _, which, run in rows:
            iv = Interval(**_metric(run, metric)[which])
            est.append(iv.estimate)
            lo.append(iv.estimate - iv.low if math.isfinite(iv.low) else 0)
            hi.append(iv.high - iv.estimate if math.isfinite(iv.high) else 0)
        y = np.arange(len(rows))
        ax.barh(y, est, xerr=[lo, hi], color=["grey", "black"] + [f"C{i}" for i in range(len(runs))], alpha=0.8,
                capsize=3)
        ax.axvline(est[1], color="black", lw=0.8, ls=":")
        ax.set_xlim(0, 1.02)
        ax.set_title(metric if metric == SCORE else metric.split(".")[1], fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(np.arange(len(rows)), [r[0] for r in rows], fontsize=9)
    axes[0].invert_yaxis()
    fig.suptitle(f"world score of {first.eval['sample_scores']['num_samples']} held-out captions' samples "
                 "(same seeds), 95% intervals; dotted: the base", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _setup(cfg, runs: dict[str, Run], facts: dict[str, Any]) -> list[str]:
    t, v, s = cfg.train, cfg.video, cfg.evaluate.samples
    b = facts["base_model"]
    bs = b["settings"]
    first = next(iter(runs.values()))
    return [
        f"- World: {v.width}x{v.height} clips of {v.num_frames} frames at {v.fps:g} fps (regdpo/world). The base model "
        f"trained on {b['num_clips']} clips of one world; GT-Pair uses {facts['num_clips']} clips of another it never "
        f"saw ({facts['num_train']} train pairs, {facts['num_heldout']} held out).",
        f"- Base model: Wan 2.1 text-to-video classes trained from scratch (experiments/world/base_model.py): "
        f"AutoencoderKLWan ({b['parameters']['vae'] / 1e6:.2f}M parameters; {bs['vae_image_steps']} steps on frames, "
        f"{bs['vae_short_clip_steps']} on 5-frame windows, {bs['vae_clip_steps']} on whole clips), "
        f"WanTransformer3DModel ({b['parameters']['transformer'] / 1e6:.2f}M; "
        f"{bs['steps']} steps of {bs['batch_size']}), the tiny preset's MiniLM text encoder. Training took "
        f"{b['seconds']['wall']:.0f} s wall, {b['seconds']['cpu']:.0f} s CPU"
        + (" (this run reused it from the cache)." if b["cached"] else "."),
        f"- Negatives and evaluation samples: {s.num_inference_steps} sampler steps, guidance {s.guidance_scale:g}; "
        f"evaluation scores {first.eval['sample_scores']['num_samples']} held-out captions, base and tuned with the "
        "same seed per caption.",
        f"- Every variant: LoRA rank {t.lora.rank}, lr {t.learning_rate:g}, {t.max_steps} steps of {t.batch_size} "
        f"pairs, β = {t.beta:g}, seed {t.seed}; only the objective and r differ.",
    ]


def write_results(runs: dict[str, Path], docs: Path, facts: dict[str, Any], clock: Clock, cfg) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    names = list(runs)
    compare_runs(list(runs.values()), docs, names=names)
    loaded = {n: load_run(p, n) for n, p in runs.items()}
    plot_r_sweep(loaded, docs / "r_sweep.png")
    plot_scores(loaded, docs / "world_score.png")
    for name in ("dpo", "reg-dpo", "sft"):
        sheet = runs.get(name, Path("/nonexistent")) / "eval" / "samples.png"
        if sheet.is_file():
            shutil.copy(sheet, docs / f"samples_{name}.png")
    p = facts["pairs"]
    cpu = dict(clock.cpu)
    lines = ["# World experiment: results", "",
             "Written by `python -m experiments.world` (experiments/world/README.md); the discussion is in "
             "[../EXPERIMENT.md](../EXPERIMENT.md).", "", "## Setup", "", *_setup(cfg, loaded, facts), "",
             "## Data facts", "",
             f"- Pairs (train split): mean squared distance winner-loser {fmt(p['mse_winner_loser'])} in latent space "
             f"(winner variance {fmt(p['winner_variance'])}); variance of the negatives across clips "
             f"{fmt(p['loser_variance_across_clips'])}: every negative is the base model's own attempt at its caption.",
             "", "## Base vs each variant", "",
             "World score: mean over the held-out captions' samples, 95% interval; change: tuned - base per caption "
             "(paired), with the verdict. Caption / motion / consistency: the change of each part. Training columns: "
             "mean over the last 10% of steps. Held-out real-clip error: denoising error on the held-out real clips, "
             "tuned - base.", "",
             *main_table(loaded, facts["vae_round_trip"]), "",
             "![world score](world_score.png)", "", "![runs compared](compare.png)", "", "![r sweep](r_sweep.png)", "",
             "## Does tuning make better videos?", "", "| claim | measured | |", "|---|---|---|",
             *[f"| {c} | {m} | **{v}** |" for c, m, v in quality_claims(loaded)], "",
             "## METHOD.md's claims, checked on the training curves", "",
             "| claim | measured | here |", "|---|---|---|",
             *[f"| {c} | {m} | **{v}** |" for c, m, v in claims(loaded, cfg.train.beta)], "",
             "## Time", "",
             f"Load average at the start {facts['load_at_start']}, at the end {facts['load_at_end']} (2 cores).", "",
             "| phase | wall seconds | CPU seconds (user + sys) |", "|---|---|---|",
             *[f"| {ph} | {s:g} | {cpu.get(ph, float('nan')):g} |" for ph, s in clock.phases],
             f"| total | {clock.total:.1f} | {clock.total_cpu:.1f} |", ""]
    for name in ("dpo", "reg-dpo", "sft"):
        if (docs / f"samples_{name}.png").is_file():
            lines += [f"![samples of {name}](samples_{name}.png)", ""]
    out = docs / "results.md"
    out.write_text("\n".join(lines))
    (docs / "results.json").write_text(json.dumps(
        {"facts": facts, "phases": clock.phases, "cpu": clock.cpu, "total_seconds": clock.total,
         "total_cpu_seconds": clock.total_cpu,
         "world_score": {n: _metric(r, SCORE) for n, r in loaded.items()}}, indent=2))
    return out
