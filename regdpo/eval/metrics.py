"""Held-out evaluation of a tuned model against its base, at fixed timesteps and noise.

For every held-out pair and every t in `timesteps`, one fixed ε (seeded by the pair's key)
is shared by winner and loser, and the per-sample error (METHOD.md's err) is measured for
the base model (adapters disabled) and the tuned model (adapters enabled).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from regdpo.data.shards import conditioning
from regdpo.flow_matching import noisy_and_target, pair_noise
from regdpo.losses import per_sample_error


def _pair_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16))


@torch.no_grad()
def pair_errors(use: Callable[[str], Any], pairs: Iterable[dict[str, Any]], timesteps: list[float], seed: int
                ) -> list[dict[str, Any]]:
    """One row per (pair, t): err_{base,tuned}_{w,l}. `use("base" | "tuned")` returns the spec
    set up to predict as that model (see stages/evaluate.py's BaseAndTuned)."""
    spec = use("base")
    rows = []
    for pair in pairs:
        x_w = pair["latents_w"][None].to(spec.device, torch.float32)
        x_l = pair["latents_l"][None].to(spec.device, torch.float32)
        cond = {k: torch.cat([v[None], v[None]]).to(spec.device) for k, v in conditioning(pair).items()}
        noise = pair_noise(x_w, _pair_generator(seed, pair["key"]))
        for t_val in timesteps:
            t = torch.full((1,), t_val, device=spec.device)
            xt_w, y_w = noisy_and_target(spec.prediction_type, x_w, noise, t)
            xt_l, y_l = noisy_and_target(spec.prediction_type, x_l, noise, t)
            noisy, target, t2 = torch.cat([xt_w, xt_l]), torch.cat([y_w, y_l]), torch.cat([t, t])
            row = {"key": pair["key"], "t": t_val}
            for name in ("base", "tuned"):
                err = per_sample_error(use(name).predict(noisy, t2, cond), target)
                row[f"err_{name}_w"], row[f"err_{name}_l"] = err[0].item(), err[1].item()
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate pair_errors rows into the numbers of eval/metrics.json."""
    if not rows:
        raise ValueError("no held-out pairs to evaluate: the heldout split is empty (raise ingest.min_heldout)")
    col = {k: np.array([r[k] for r in rows]) for k in rows[0] if k.startswith("err_")}
    s = (col["err_tuned_w"] - col["err_tuned_l"]) - (col["err_base_w"] - col["err_base_l"])
    ts = sorted({r["t"] for r in rows})
    per_t = {
        name: {f"{t:g}": float(np.mean([r[f"err_{name}_w"] for r in rows if r["t"] == t])) for t in ts}
        for name in ("base", "tuned")
    }
    base_w, tuned_w = float(col["err_base_w"].mean()), float(col["err_tuned_w"].mean())
    return {
        "num_pairs": len({r["key"] for r in rows}),
        "timesteps": ts,
        "implicit_acc": float((s < 0).mean()),
        "s": float(s.mean()),
        "win_gap": float((col["err_tuned_w"] - col["err_base_w"]).mean()),
        "lose_gap": float((col["err_tuned_l"] - col["err_base_l"]).mean()),
        "preference_acc": {  # fraction of (pair, t) where the model fits the real clip better than its negative
            "base": float((col["err_base_w"] < col["err_base_l"]).mean()),
            "tuned": float((col["err_tuned_w"] < col["err_tuned_l"]).mean()),
        },
        "denoise_error_real": {
            "base": base_w,
            "tuned": tuned_w,
            "relative_change": (tuned_w - base_w) / base_w if base_w else float("nan"),
            "per_t": per_t,
        },
    }
