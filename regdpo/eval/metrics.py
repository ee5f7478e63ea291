"""Held-out evaluation of a tuned model against its base, at fixed timesteps and noise.

For every held-out pair and every t in `timesteps`, one fixed ε (seeded by the pair's key)
is shared by winner (the real clip) and loser (its negative), and the per-sample error
(METHOD.md's err) is measured for the base and the tuned model. `summarize` turns those rows
into per-pair changes with paired-bootstrap intervals and a verdict per metric (stats.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from regdpo.data.shards import conditioning
from regdpo.eval.stats import COMPONENT, MARGIN, SAMPLES, Interval, mean_interval, proportion_interval, shifted, verdict
from regdpo.flow_matching import pair_noise
from regdpo.hashing import derive_seed
from regdpo.losses import per_sample_error

MODELS = ("base", "tuned")
MEMBERS = {"w": "real", "l": "negative"}


def _pair_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, key, bits=32))


@torch.no_grad()
def pair_errors(use: Callable[[str], Any], pairs: Iterable[dict[str, Any]], timesteps: list[float], seed: int,
                progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One row per (pair, t): err_{base,tuned}_{w,l}; `progress(1)` is called after each pair.

    `use("base" | "tuned")` returns that model bound to its spec (`spec.bind(denoiser)`: device,
    noisy_and_target, predict); it is called right before each model's forward pass, so a LoRA
    toggle behind it is always in the state asked for.
    """
    rows = []
    for pair in pairs:
        model = use("base")
        x_w = pair["latents_w"][None].to(model.device, torch.float32)
        x_l = pair["latents_l"][None].to(model.device, torch.float32)
        cond = {k: torch.cat([v[None], v[None]]).to(model.device) for k, v in conditioning(pair).items()}
        noise = pair_noise(x_w, _pair_generator(seed, pair["key"]))
        for t_val in timesteps:
            t = torch.full((1,), t_val, device=model.device)
            xt_w, y_w = model.noisy_and_target(x_w, noise, t)
            xt_l, y_l = model.noisy_and_target(x_l, noise, t)
            noisy, target, t2 = torch.cat([xt_w, xt_l]), torch.cat([y_w, y_l]), torch.cat([t, t])
            row = {"key": pair["key"], "t": t_val}
            for name in MODELS:
                err = per_sample_error(use(name).predict(noisy, t2, cond), target)
                row[f"err_{name}_w"], row[f"err_{name}_l"] = err[0].item(), err[1].item()
            rows.append(row)
        if progress is not None:
            progress(1)
    return rows


def verdict_row(metric: str, label: str, base: float | None, tuned: float, interval: Interval, *,
                better: str, want: str, unit: str = "pairs", role: str = SAMPLES, short: str | None = None
                ) -> dict[str, Any]:
    """One line of the verdict table: the interval is on the change (tuned - base), null 0.
    `role` (stats.MARGIN, COMPONENT or SAMPLES) says how the headline reads it; `short`, a name
    for a sentence (default: `label`)."""
    return {"metric": metric, "label": label, "short": short or label, "base": base, "tuned": tuned,
            "change": interval.estimate, "interval": interval.as_dict(), "better": better, "want": want, "unit": unit,
            "verdict": verdict(interval, better=better), "role": role}


def latent_separation(pairs: Iterable[dict[str, Any]]) -> dict[str, float]:
    """How far apart the two members of a pair are in latent space: the mean over pairs of the
    mean squared distance between latents_w and latents_l, beside the winners' variance. The
    noise the errors are measured under has variance 1: a separation orders of magnitude below
    it leaves the preference term almost nothing to learn from."""
    dist, var = [], []
    for p in pairs:
        w, lose = p["latents_w"].float(), p["latents_l"].float()
        dist.append(float((w - lose).pow(2).mean()))
        var.append(float(w.var()))
    if not dist:
        raise ValueError("latent_separation needs at least one pair")
    return {"mean_squared_distance": float(np.mean(dist)), "winner_variance": float(np.mean(var)),
            "num_pairs": len(dist)}


class _PairTable:
    """The error rows as arrays indexed [pair, t], pairs in first-seen order."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.keys = list(dict.fromkeys(r["key"] for r in rows))
        self.ts = sorted({r["t"] for r in rows})
        kidx, tidx = {k: i for i, k in enumerate(self.keys)}, {t: j for j, t in enumerate(self.ts)}
        self.err = {f"{m}_{x}": np.full((len(self.keys), len(self.ts)), np.nan) for m in MODELS for x in MEMBERS}
        for r in rows:
            for name, arr in self.err.items():
                arr[kidx[r["key"]], tidx[r["t"]]] = r[f"err_{name}"]
        missing = [n for n, a in self.err.items() if np.isnan(a).any()]
        if missing:
            raise ValueError(f"pair_errors rows are incomplete ({', '.join(missing)}): every pair needs every timestep")


def summarize(rows: list[dict[str, Any]], *, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
              ) -> dict[str, Any]:
    """Aggregate pair_errors rows into eval/metrics.json: means, per-timestep curves, and the
    verdict rows of the error metrics (intervals over pairs, each pair averaged over t)."""
    if not rows:
        raise ValueError("no held-out pairs to evaluate: the heldout split is empty (raise ingest.min_heldout)")
    tab = _PairTable(rows)
    e = tab.err
    boot = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    s_pt = (e["tuned_w"] - e["tuned_l"]) - (e["base_w"] - e["base_l"])  # [pair, t]
    win_pt, lose_pt = e["tuned_w"] - e["base_w"], e["tuned_l"] - e["base_l"]
    pref = {m: (e[f"{m}_w"] < e[f"{m}_l"]).astype(float) for m in MODELS}
    # A pair counts once, with its s averaged over t: the timesteps of a pair are not independent.
    pair_acc = proportion_interval(int((s_pt.mean(1) < 0).sum()), len(tab.keys), confidence=confidence)

    def per_t(member: str) -> dict[str, Any]:
        return {m: {f"{t:g}": float(e[f"{m}_{member}"][:, j].mean()) for j, t in enumerate(tab.ts)} for m in MODELS}

    def error_block(member: str) -> dict[str, Any]:
        base, tuned = float(e[f"base_{member}"].mean()), float(e[f"tuned_{member}"].mean())
        return {"base": base, "tuned": tuned, "relative_change": (tuned - base) / base if base else float("nan"),
                "per_t": per_t(member)}

    verdicts = [
        verdict_row("s", "margin s = win gap - lose gap", 0.0, float(s_pt.mean()), mean_interval(s_pt.mean(1), **boot),
                    better="lower", want="< 0", role=MARGIN),
        verdict_row("implicit_acc", "implicit accuracy: share of pairs with s < 0", 0.5, float(pair_acc.estimate),
                    shifted(pair_acc, 0.5), better="higher", want="> 0.5, chance", role=MARGIN),
        verdict_row("denoise_error_real", "win gap: denoising error on the real clips", float(e["base_w"].mean()),
                    float(e["tuned_w"].mean()), mean_interval(win_pt.mean(1), **boot), better="lower", want="lower",
                    role=COMPONENT),
        verdict_row("denoise_error_negative", "lose gap: denoising error on their negatives", float(e["base_l"].mean()),
                    float(e["tuned_l"].mean()), mean_interval(lose_pt.mean(1), **boot), better="higher",
                    want="higher", role=COMPONENT),
    ]
    timestep_rows = []
    for j, t in enumerate(tab.ts):
        row: dict[str, Any] = {"t": t, "s": mean_interval(s_pt[:, j], **boot).as_dict()}
        for member, name in MEMBERS.items():
            change = e[f"tuned_{member}"][:, j] - e[f"base_{member}"][:, j]
            row[name] = {"base": float(e[f"base_{member}"][:, j].mean()),
                         "tuned": float(e[f"tuned_{member}"][:, j].mean()),
                         "change": mean_interval(change, **boot).as_dict()}
        timestep_rows.append(row)
    return {
        "num_pairs": len(tab.keys),
        "timesteps": tab.ts,
        "implicit_acc": float((s_pt < 0).mean()),
        "s": float(s_pt.mean()),
        "win_gap": float(win_pt.mean()),
        "lose_gap": float(lose_pt.mean()),
        "implicit_acc_pairs": pair_acc.as_dict(),
        # how far apart the base model's errors on the two members are: what the margin works with
        "base_error_gap": float(np.abs(e["base_w"] - e["base_l"]).mean()),
        # fraction of (pair, t) where the model fits the real clip better than its negative
        "preference_acc": {m: float(pref[m].mean()) for m in MODELS},
        "denoise_error_real": error_block("w"),
        "denoise_error_negative": error_block("l"),
        "per_timestep": timestep_rows,
        "verdicts": verdicts,
    }
