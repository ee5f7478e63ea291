"""Evaluate stage: base vs tuned on held-out pairs; metrics, plots, samples, report.

Reads shards/ (heldout split), train/ (final weights, metrics.jsonl); writes eval/metrics.json,
eval/report.md, eval/training_curves.png, eval/denoise_error.png, eval/samples/*.mp4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from regdpo.config import Config
from regdpo.data.shards import iter_pairs, shard_urls
from regdpo.data.video import write_mp4
from regdpo.eval.metrics import pair_errors, summarize
from regdpo.eval.plots import plot_denoise_error, plot_training_curves, read_metrics
from regdpo.eval.report import write_report
from regdpo.stages.common import load_spec

NUM_SAMPLE_VIDEOS = 2


def load_tuned(cfg: Config, workdir: Path):
    """The base spec with the trained weights of train/final attached (LoRA: toggled by adapters)."""
    spec = load_spec(cfg)
    final = workdir / "train" / "final"
    if cfg.train.finetune != "lora":
        raise NotImplementedError("evaluate supports LoRA runs (train.finetune: lora) for now")
    spec.add_lora(cfg.train.lora)
    spec.load_lora(final)
    spec.transformer.eval()
    return spec


def _samples(spec, cfg: Config, pairs: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Base and tuned videos for the first held-out captions, same seed: eval/samples/<id>-{base,tuned}.mp4."""
    v, g = cfg.video, cfg.generate
    (out / "samples").mkdir(exist_ok=True)
    made = []
    for pair in pairs[:NUM_SAMPLE_VIDEOS]:
        caption, cid = pair["meta"]["caption"], pair["key"]
        for name, enabled in (("base", False), ("tuned", True)):
            spec.set_adapters_enabled(enabled)
            video = spec.generate([caption], [cfg.evaluate.seed], num_frames=v.num_frames, height=v.height,
                                  width=v.width, num_inference_steps=g.num_inference_steps,
                                  guidance_scale=g.guidance_scale, negative_prompt=g.negative_prompt,
                                  flow_shift=g.flow_shift)[0]
            write_mp4(out / "samples" / f"{cid}-{name}.mp4", video, v.fps)
        spec.set_adapters_enabled(True)
        made.append((cid, caption))
    return made


def build(cfg: Config, workdir: Path, out: Path) -> dict[str, Any]:
    spec = load_tuned(cfg, workdir)
    pairs = list(iter_pairs(shard_urls(workdir / "shards", "heldout")))
    summary = summarize(pair_errors(spec, pairs, cfg.evaluate.timesteps, cfg.evaluate.seed))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))

    train_metrics = read_metrics(workdir / "train" / "metrics.jsonl")
    train_record = json.loads((workdir / "train" / "stage.json").read_text())
    plots = [plot_training_curves(train_metrics, out / "training_curves.png").name,
             plot_denoise_error(summary, out / "denoise_error.png").name]
    samples = _samples(spec, cfg, pairs, out) if not cfg.model.family.endswith("i2v") else []
    write_report(out, summary, train_record.get("summary", {}), train_metrics[-1] if train_metrics else None,
                 plots, samples)
    return {"num_pairs": summary["num_pairs"], "implicit_acc": summary["implicit_acc"],
            "win_gap": summary["win_gap"], "lose_gap": summary["lose_gap"]}
