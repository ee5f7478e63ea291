"""Sample-based metrics: real held-out clips against each model's samples for the same captions.

- a Fréchet distance between features of the real clips and of a model's samples (frechet.py,
  features.py), base and tuned, with a paired bootstrap over captions: a resample picks the
  same captions for the real set and both sample sets;
- temporal consistency against the real clips (temporal.py), per caption.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from regdpo.eval.features import FeatureExtractor
from regdpo.eval.frechet import frechet_distance_between
from regdpo.eval.metrics import verdict_row
from regdpo.eval.stats import mean_interval, set_interval
from regdpo.eval.temporal import temporal_gaps, temporal_stats


def _stack(features: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    return np.concatenate([features[i] for i in idx])


def sample_metrics(real: list[np.ndarray], videos: dict[str, list[np.ndarray]], extractor: FeatureExtractor, *,
                   num_resamples: int = 2000, set_resamples: int = 400, confidence: float = 0.95, seed: int = 0,
                   min_sets: int = 5) -> dict[str, Any]:
    """`real[i]`, `videos["base"][i]`, `videos["tuned"][i]`: clip i's real frames and the two
    models' samples for its caption (same seed). Returns details and verdict rows."""
    n = len(real)
    if n == 0 or any(len(v) != n for v in videos.values()):
        raise ValueError(f"sample_metrics: {n} real clips but {', '.join(f'{len(v)} {k}' for k, v in videos.items())}")
    feats = {"real": [extractor(v) for v in real], **{k: [extractor(x) for x in v] for k, v in videos.items()}}

    def fd(name: str, idx: np.ndarray) -> float:
        a, b = _stack(feats["real"], idx), _stack(feats[name], idx)
        # Fewer than 2 vectors (clip-level features of one clip) has no covariance.
        return frechet_distance_between(a, b) if len(a) >= 2 else float("nan")

    fds = {k: fd(k, np.arange(n)) for k in ("base", "tuned")}
    boot = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    fd_change = set_interval(lambda idx: fd("tuned", idx) - fd("base", idx), n, num_resamples=set_resamples,
                             confidence=confidence, seed=seed, min_sets=min_sets, unit="clips")
    gaps = {k: temporal_gaps(real, v) for k, v in videos.items()}
    rows = [
        verdict_row("frechet", extractor.label, fds["base"], fds["tuned"], fd_change, better="lower", want="lower",
                    unit="clips", short="the Fréchet distance"),
        verdict_row("temporal_motion_gap", "motion gap to the real clip: |motion(sample) - motion(real)|",
                    float(gaps["base"]["motion"].mean()), float(gaps["tuned"]["motion"].mean()),
                    mean_interval(gaps["tuned"]["motion"] - gaps["base"]["motion"], **boot), better="lower",
                    want="lower", unit="clips", short="the motion gap"),
        verdict_row("temporal_flicker_gap", "flicker gap to the real clip: |flicker(sample) - flicker(real)|",
                    float(gaps["base"]["flicker"].mean()), float(gaps["tuned"]["flicker"].mean()),
                    mean_interval(gaps["tuned"]["flicker"] - gaps["base"]["flicker"], **boot), better="lower",
                    want="lower", unit="clips", short="the flicker gap"),
    ]
    stats = {k: [temporal_stats(v) for v in vs] for k, vs in {"real": real, **videos}.items()}
    return {
        "num_clips": n,
        "feature_extractor": {**extractor.describe(), "num_feature_rows": len(_stack(feats["real"], np.arange(n))),
                              "dims": int(feats["real"][0].shape[1])},
        "frechet": fds,
        "temporal": {k: {s: float(np.mean([d[s] for d in v])) for s in ("motion", "flicker")} for k, v in stats.items()},
        "verdicts": rows,
    }
