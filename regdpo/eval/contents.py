"""What the evaluation report says, in order, as blocks (report.py renders them).

Order: the verdict, the training curves with plain observations, the per-timestep errors, the
samples, the distribution metrics, the configuration. It never overstates: a tiny random-init
model says so first, a proxy metric is called a proxy, and the number of pairs is always given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from regdpo.eval.plots import LN2, ema, equal_series, series
from regdpo.eval.report import Block, fmt, headline, timestep_table, verdict_table

LAST_STEP_KEYS = ("loss", "dpo_loss", "sft_loss", "s", "dgr", "r", "win_gap", "lose_gap", "implicit_acc")


def training_observations(rows: list[dict[str, Any]], beta: float) -> list[str]:
    """Plain sentences about the curves that a reader would otherwise have to work out."""
    notes = []
    if not rows:
        return ["No training steps were logged."]
    half = len(rows) // 2
    _, dpo = series(rows, "dpo_loss")
    if len(dpo) >= 4 and abs(float(np.mean(dpo[half:])) - LN2) < 0.05:
        notes.append(f"The DPO loss averaged {float(np.mean(dpo[half:])):.3f} over the last half of training, within "
                     "0.05 of ln 2 = 0.693: β·s stayed near 0, so the preference term barely learned; what changed "
                     "came from the SFT term (if any).")
    _, acc = series(rows, "implicit_acc")
    if len(acc) >= 4 and abs(float(np.mean(acc[half:])) - 0.5) < 0.1:
        notes.append(f"Training implicit accuracy averaged {float(np.mean(acc[half:])):.2f} over the last half: "
                     "chance level.")
    _, dgr = series(rows, "dgr")
    if len(dgr) and dgr[-1] < 0.01 * beta / 2:
        notes.append(f"DGR collapsed: {fmt(float(ema(dgr)[-1]))} at the end (moving average) against β/2 = {beta / 2:g} "
                     "at the start; the DPO gradient of both members has all but vanished.")
    _, r = series(rows, "r")
    if equal_series(dgr, r):
        notes.append("r equals DGR at every step, so the two curves are one line.")
    _, win = series(rows, "win_gap")
    _, s = series(rows, "s")
    if len(win) >= 4 and len(s) == len(win):
        w_end, s_end = float(ema(win)[-1]), float(ema(s)[-1])
        if w_end > 0 and s_end < 0:
            notes.append(f"The win gap ended positive ({fmt(w_end)}) while s is negative ({fmt(s_end)}): the model fits "
                         "the real clips worse than the reference and the negatives even worse (METHOD.md's 'cheating' "
                         "path).")
        _, lose = series(rows, "lose_gap")
        if len(lose) == len(win):
            scale = max(float(np.abs(win).max()), 1e-12)
            if float(np.abs(win - lose).max()) < 0.05 * scale:
                notes.append("The win gap and lose gap moved together (they differ by s, under 5% of their size): "
                             "the model changed its fit of real clips and negatives alike; see the margin s panel.")
    return notes


def report_blocks(*, summary: dict[str, Any], config_yaml: str, toy_note: str | None, beta: float,
                  train_rows: list[dict[str, Any]], unread_lines: int, plots: dict[str, str],
                  samples: list[dict[str, Any]], sample_files: dict[str, str]) -> list[Block]:
    """`toy_note`: the warning a toy-sized model's report opens with (report.toy_warning), or None;
    `plots`: {"training": png, "denoise": png, "samples": png} (names relative to the report);
    `samples`: per caption {clip_id, caption, seed, tuned_vs_base}; `sample_files`: {"grid": mp4}."""
    n = summary["num_pairs"]
    blocks = [Block("h1", "regdpo evaluation report")]
    if toy_note:
        blocks.append(Block("warn", toy_note))
    rows = summary["verdicts"]
    blocks += [
        Block("h2", "Verdict: tuned against base"),
        Block("p", headline(rows, n)),
        verdict_table(rows),
        Block("p", f"Denoising errors: {n} held-out pairs, timesteps {', '.join(f'{t:g}' for t in summary['timesteps'])}, "
                   "one fixed noise per pair shared by real clip, negative, base and tuned; each pair's value is its "
                   "mean over the timesteps. Intervals: " + _methods(rows) + "."),
        Block("p", "Which member each model fits better, over (pair, t): the base model fits the real clip better than "
                   f"its negative in {summary['preference_acc']['base']:.0%} of cases, the tuned model in "
                   f"{summary['preference_acc']['tuned']:.0%}."),
    ]
    blocks += [Block("h2", "Training"), *_training(train_rows, unread_lines, beta, plots.get("training"))]
    blocks += [Block("h2", "Denoising error per timestep"), timestep_table(summary["per_timestep"])]
    if plots.get("denoise"):
        blocks.append(Block("img", "denoising error per timestep", path=plots["denoise"]))
    blocks += _samples(samples, plots.get("samples"), sample_files)
    if "sample_metrics" in summary:
        blocks += _distribution(summary["sample_metrics"], rows)
    blocks += [Block("h2", "Configuration"), Block("code", config_yaml)]
    return blocks


def _methods(rows: list[dict[str, Any]]) -> str:
    methods = sorted({r["interval"]["method"] for r in rows if r["interval"]["method"] != "none"})
    return "; ".join(methods) or "none could be computed"


def _training(rows: list[dict[str, Any]], unread: int, beta: float, png: str | None) -> list[Block]:
    blocks = []
    if rows:
        last = rows[-1]
        blocks.append(Block("p", f"{len(rows)} steps logged. Last step: " + ", ".join(
            f"{k} = {fmt(last[k])}" for k in LAST_STEP_KEYS if k in last) + "."))
    if unread:
        blocks.append(Block("p", f"{unread} line(s) of train/metrics.jsonl could not be read and were skipped."))
    notes = training_observations(rows, beta)
    if notes:
        blocks.append(Block("list", items=notes))
    if png:
        blocks.append(Block("img", "training curves", path=png))
    return blocks


def _samples(samples: list[dict[str, Any]], sheet: str | None, files: dict[str, str]) -> list[Block]:
    blocks = [Block("h2", "Samples: same caption, same seed")]
    if not samples:
        return blocks + [Block("p", "No samples (evaluate.samples.num_samples is 0).")]
    body = [[s["clip_id"], s["caption"], str(s["seed"]), f"{s['tuned_vs_base']:.3g}"] for s in samples]
    blocks.append(Block("table", header=["clip", "caption", "seed", "mean |tuned - base| (0..255)"], rows=body))
    identical = [s["clip_id"] for s in samples if s["tuned_vs_base"] == 0]
    if identical:
        blocks.append(Block("p", f"The base and tuned samples are pixel-identical for {len(identical)} of "
                                 f"{len(samples)} captions."))
    if sheet:
        blocks.append(Block("img", "real, base and tuned frames", path=sheet))
    if files.get("grid"):
        blocks.append(Block("video", "side-by-side video (real | base | tuned)", path=files["grid"]))
    return blocks


def _distribution(m: dict[str, Any], verdicts: list[dict[str, Any]]) -> list[Block]:
    fx = m["feature_extractor"]
    blocks = [Block("h2", "Distribution metrics"),
              Block("p", f"{fx['label']}: {fx['description']}. {m['num_clips']} real held-out clips against each "
                         f"model's {m['num_clips']} samples; {fx['num_feature_rows']} feature vectors of {fx['dims']} "
                         f"values per set (one per {fx['per']}).")]
    if fx["is_proxy"]:
        blocks.append(Block("warn", "PROXY metric: these features are pixel statistics, not a trained video network; "
                                    "the distance is not FID or FVD and is not comparable with published numbers. "
                                    "Set evaluate.feature_extractor to a local CLIP or VideoMAE directory for one."))
    temp = m["temporal"]
    blocks.append(Block("table", header=["clips", "motion (mean |frame change|)", "flicker (mean |change of change|)"],
                        rows=[[k, fmt(v["motion"]), fmt(v["flicker"])] for k, v in temp.items()]))
    blocks.append(Block("p", "Temporal consistency compares each sample with the real clip of the same caption: how "
                             "much the picture changes between frames (motion) and how abruptly (flicker). It measures "
                             "the amount and smoothness of change, not whether it is the right motion."))
    fd = next((v for v in verdicts if v["metric"] == "frechet"), None)
    if fd is not None and not math.isfinite(fd["interval"]["low"]):
        blocks.append(Block("p", f"The Fréchet distance has no interval here: {fd['interval']['note']}."))
    return blocks
