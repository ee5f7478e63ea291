"""eval/report.md: what a person reads after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def write_report(out: Path, summary: dict[str, Any], train_summary: dict[str, Any], last_step: dict[str, Any] | None,
                 plots: list[str], samples: list[tuple[str, str]]) -> Path:
    d = summary["denoise_error_real"]
    lines = [
        "# regdpo evaluation report",
        "",
        f"Held-out pairs: {summary['num_pairs']}, timesteps {', '.join(f'{t:g}' for t in summary['timesteps'])} "
        "(one fixed noise per pair, shared by winner and loser). Tuned = base + the trained weights in train/final.",
        "",
        "## Preference (tuned against base as reference)",
        "",
        "| metric | value | want |",
        "|---|---|---|",
        f"| implicit accuracy (fraction with s < 0) | {_fmt(summary['implicit_acc'])} | > 0.5 |",
        f"| mean s | {_fmt(summary['s'])} | < 0 |",
        f"| win gap = err_tuned(real) - err_base(real) | {_fmt(summary['win_gap'])} | < 0 |",
        f"| lose gap = err_tuned(negative) - err_base(negative) | {_fmt(summary['lose_gap'])} | > 0 |",
        "",
        "## Which sample each model fits better",
        "",
        "| model | fraction with err(real) < err(negative) |",
        "|---|---|",
        f"| base | {_fmt(summary['preference_acc']['base'])} |",
        f"| tuned | {_fmt(summary['preference_acc']['tuned'])} |",
        "",
        "## Denoising error on the real held-out clips",
        "",
        "| t | base | tuned |",
        "|---|---|---|",
        *[f"| {t} | {_fmt(d['per_t']['base'][t])} | {_fmt(d['per_t']['tuned'][t])} |" for t in d["per_t"]["base"]],
        f"| mean | {_fmt(d['base'])} | {_fmt(d['tuned'])} ({d['relative_change']:+.2%}) |",
        "",
        "## Training",
        "",
        f"Steps: {train_summary.get('steps')}, final loss {_fmt(train_summary.get('final_loss', float('nan')))}.",
    ]
    if last_step:
        lines.append(
            f"Last step: s = {_fmt(last_step['s'])}, DGR = {_fmt(last_step['dgr'])}, r = {_fmt(last_step['r'])}, "
            f"win gap = {_fmt(last_step['win_gap'])}, lose gap = {_fmt(last_step['lose_gap'])}, "
            f"implicit accuracy = {_fmt(last_step['implicit_acc'])}."
        )
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    if samples:
        lines += ["## Samples (same seed, base vs tuned)", "", "| clip | caption | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {cid} | {cap} | [base](samples/{cid}-base.mp4) | [tuned](samples/{cid}-tuned.mp4) |"
                  for cid, cap in samples]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
