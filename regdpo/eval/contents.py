"""What the evaluation report says, in order, as blocks (report.py renders them).

Order: one sentence of verdict (headline.py), the warnings, why the preference term could not
learn when the data say so, the verdict table, the training curves with plain observations, the
per-timestep margin and errors, the samples, the distribution metrics, the configuration. It
never overstates: a tiny random-init model says so, a proxy metric is called a proxy, and the
number of pairs is always given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from regdpo.eval.plots import LN2, ema, equal_series, series
from regdpo.eval.headline import decide, pairs_note, training_end
from regdpo.eval.report import Block, fmt, interval_note, timestep_table, verdict_table

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
    end = training_end(rows)
    if end is not None and end.degenerate:
        notes.append(f"The win gap ended positive ({fmt(end.win_gap)}) while s is negative ({fmt(end.s)}): the model "
                     "fits the real clips worse than the reference and the negatives even worse (METHOD.md's "
                     "'cheating' path).")
    _, win = series(rows, "win_gap")
    _, lose = series(rows, "lose_gap")
    if end is not None and len(lose) == len(win):
        scale = max(float(np.abs(win).max()), 1e-12)
        if float(np.abs(win - lose).max()) < 0.05 * scale:
            notes.append("The win gap and lose gap moved together (they differ by s, under 5% of their size): "
                         "the model changed its fit of real clips and negatives alike; see the margin s panel.")
    return notes


# Below this mean squared distance between a pair's two latents (the noise has variance 1), the
# preference term has next to nothing to learn from: docs/EXPERIMENT.md measured 1e-4 (no margin
# learned) against 0.137 once the latents were normalised (a margin learned).
SEPARATION_FLOOR = 1e-2


def report_blocks(*, summary: dict[str, Any], config_yaml: str, toy_note: str | None, beta: float,
                  train_rows: list[dict[str, Any]], unread_lines: int, plots: dict[str, str],
                  samples: list[dict[str, Any]], sample_files: dict[str, str], experiment_doc: str | None = None
                  ) -> list[Block]:
    """`toy_note`: the warning a toy-sized model's report opens with (report.toy_warning), or None;
    `plots`: {"training": png, "denoise": png, "samples": png} (names relative to the report);
    `samples`: per caption {clip_id, caption, seed, tuned_vs_base}; `sample_files`: {"grid": mp4};
    `experiment_doc`: a link to docs/EXPERIMENT.md from the report's folder, where there is one."""
    n = summary["num_pairs"]
    rows = summary["verdicts"]
    decision = decide(rows, train_rows)
    blocks = [Block("h1", "regdpo evaluation report"), Block("p", decision.sentence)]
    if toy_note:
        blocks.append(Block("warn", toy_note))
    if summary.get("identical_predictions"):
        blocks.append(Block("warn", "Base and tuned gave identical predictions on every held-out pair: train/final "
                                    "changed nothing, or the comparison is not between two different models."))
    why = _why_no_margin(summary, experiment_doc)
    if why:
        blocks.append(Block("p", why))
    blocks += [
        Block("h2", "Verdict: tuned against base"),
        verdict_table(rows),
        Block("p", " ".join(filter(None, [interval_note(rows), pairs_note(n)]))),
        Block("p", f"Denoising errors: {n} held-out pairs, timesteps {', '.join(f'{t:g}' for t in summary['timesteps'])}, "
                   "one fixed noise per pair shared by real clip, negative, base and tuned; each pair's value is its "
                   "mean over the timesteps."),
        Block("p", "Which member each model fits better, over (pair, t): the base model fits the real clip better than "
                   f"its negative in {summary['preference_acc']['base']:.0%} of cases, the tuned model in "
                   f"{summary['preference_acc']['tuned']:.0%}."),
    ]
    blocks += [Block("h2", "Training"), *_training(train_rows, unread_lines, beta, plots.get("training"))]
    blocks += [Block("h2", "Margin and errors per timestep"), timestep_table(summary["per_timestep"])]
    if plots.get("denoise"):
        blocks.append(Block("img", "margin s and denoising errors per timestep", path=plots["denoise"]))
    blocks += _samples(samples, plots.get("samples"), sample_files)
    if "sample_metrics" in summary:
        blocks += _distribution(summary["sample_metrics"], rows)
    blocks += [Block("h2", "Configuration"), Block("code", config_yaml)]
    return blocks


def _why_no_margin(summary: dict[str, Any], doc: str | None) -> str | None:
    """Why the preference term barely learns, when the held-out pairs show it: the real clip and
    its negative are almost the same latent, so the errors the margin is made of barely differ."""
    sep = summary.get("latent_separation")
    s = next((r for r in summary["verdicts"] if r["metric"] == "s"), None)
    if not sep or s is None or s["verdict"] == "better" or sep["mean_squared_distance"] >= SEPARATION_FLOOR:
        return None
    where = f"[docs/EXPERIMENT.md]({doc})" if doc else "docs/EXPERIMENT.md (in the regdpo sources)"
    gap = summary.get("base_error_gap")
    errors = (f", and the base model's denoising errors on the two differ by {gap:.1g} on average" if gap is not None
              else "")
    return (f"Why the preference term barely learns here: a real clip and its negative lie "
            f"{sep['mean_squared_distance']:.1g} apart in latent space (mean squared distance over "
            f"{sep['num_pairs']} held-out pairs, against noise of variance 1){errors}, so β·s stays near 0 and what "
            f"moves comes from the SFT term. {where} measures this on the tiny preset and shows what it takes at "
            "this scale (latents normalised to unit variance, an SFT warm-up) for a margin to be learned.")


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
