"""Synthetic evaluation inputs shared by the report, samples and compare tests (no tests here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from regdpo.eval.distribution import sample_metrics
from regdpo.eval.features import load_feature_extractor
from regdpo.eval.metrics import summarize
from regdpo.eval.samples import SampleSet
from tests.test_eval_summary import rows_for


def train_rows(num_steps=60, *, beta=1000.0, r_scale=1.0, drift=-2e-4):
    """metrics.jsonl-like rows: s drifts down, DGR follows it, win and lose gap nearly equal."""
    rows = []
    for step in range(num_steps):
        s = drift * step
        dgr = beta / (1 + math.exp(-beta * s))
        win = -0.002 * step
        rows.append({"step": step, "loss": 0.69 + r_scale * dgr * 1.0, "dpo_loss": math.log1p(math.exp(beta * s)),
                     "sft_loss": 1.0 + win, "s": s, "dgr": dgr, "r": r_scale * dgr, "win_gap": win,
                     "lose_gap": win - s, "implicit_acc": float(step > 0), "lr": 1e-3, "grad_norm": 1.0,
                     "step_time": 0.01})
    return rows


def sample_sets(n=2, frames=5, size=16):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        real = rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)
        base = np.full_like(real, 120)
        tuned = base.copy()
        tuned[:, : size // 2] = 130
        out.append(SampleSet(f"clip{i:02d}abcdef", f"caption number {i}", 100 + i,
                             {"real": real, "base": base, "tuned": tuned}))
    return out


def summary_with_samples(num_pairs=2, **kw):
    summary = summarize(rows_for(num_pairs, real_change=kw.get("real_change", -0.1),
                                 neg_change=kw.get("neg_change", 0.0)))
    sets = sample_sets(num_pairs)
    m = sample_metrics([s.videos["real"] for s in sets],
                       {k: [s.videos[k] for s in sets] for k in ("base", "tuned")},
                       load_feature_extractor(_proxy_cfg()), set_resamples=100)
    summary["sample_metrics"] = m
    summary["verdicts"] = summary["verdicts"] + m["verdicts"]
    return summary, sets


def _proxy_cfg():
    from regdpo.config import FeatureExtractorConfig

    return FeatureExtractorConfig()


def fake_workdir(root: Path, objective: str, **train) -> Path:
    """A workdir with train/metrics.jsonl, train/config.yaml, eval/metrics.json and the stage
    records that say the evaluation is of the train/ and shards/ there."""
    import yaml

    (root / "train").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "shards").mkdir()
    rows = train_rows(r_scale=train.get("r_scale", 1.0) if objective == "reg-dpo" else 0.0)
    (root / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "train" / "config.yaml").write_text(yaml.safe_dump({"train": {
        "objective": objective, "beta": 1000.0, "r_mode": "dgr", "r_scale": 1.0, "learning_rate": 0.001,
        "max_steps": len(rows), **train}}))
    summary, _ = summary_with_samples(6)
    (root / "eval" / "metrics.json").write_text(json.dumps(summary))
    records = {"shards": {"fingerprint": "e1", "finished_at": "2026-01-01T00:00:00+0000"},
               "train": {"fingerprint": "t1", "finished_at": "2026-01-01T01:00:00+0000"},
               "eval": {"fingerprint": "v1", "upstream": {"encode": "e1", "train": "t1"},
                        "finished_at": "2026-01-01T02:00:00+0000"}}
    for folder, record in records.items():
        (root / folder / "stage.json").write_text(json.dumps(record))
    return root
