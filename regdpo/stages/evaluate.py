"""Evaluate stage: base vs tuned on held-out pairs; metrics, plots, samples, report.

Reads shards/ (heldout split), train/ (final weights, metrics.jsonl); writes eval/metrics.json,
eval/report.md, eval/training_curves.png, eval/denoise_error.png, eval/samples/*.mp4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from regdpo.config import Config
from regdpo.stages.runner import StageContext
from regdpo.data.shards import iter_pairs, shard_urls
from regdpo.data.video import read_frames, write_mp4
from regdpo.eval.metrics import pair_errors, summarize
from regdpo.eval.plots import plot_denoise_error, plot_sample_frames, plot_training_curves, read_metrics
from regdpo.eval.report import write_report
from regdpo.stages.common import load_spec

NUM_SAMPLE_VIDEOS = 2


class BaseAndTuned:
    """The base and the tuned denoiser over one spec: `use("base" | "tuned")` binds one.

    LoRA runs toggle the adapters of train/final on one denoiser (no second copy); full
    fine-tuning loads the transformer saved in train/final/transformer beside the base one.
    Only the denoiser is built here; samples load the VAE and text encoder when they need them.
    """

    def __init__(self, cfg: Config, workdir: Path):
        self.spec = load_spec(cfg)
        final = workdir / "train" / "final"
        base = self.spec.load_denoiser()
        self._lora = cfg.train.finetune == "lora"
        if self._lora:
            self.spec.add_lora(base, cfg.train.lora)
            self.spec.load_lora(base, final)
            self._models = {"base": base.eval(), "tuned": base}
        else:
            tuned = type(base).from_pretrained(final / "transformer", torch_dtype=self.spec.dtype).to(self.spec.device)
            self._models = {"base": base, "tuned": tuned.eval()}

    def use(self, which: str):
        denoiser = self._models[which]
        if self._lora:
            self.spec.set_adapters_enabled(denoiser, which == "tuned")
        return self.spec.bind(denoiser)


def _samples(models: BaseAndTuned, cfg: Config, workdir: Path, pairs: list[dict[str, Any]], out: Path
             ) -> list[dict[str, Any]]:
    """Base and tuned videos for the first held-out captions, same seed: eval/samples/<id>-{base,tuned}.mp4.

    Returns, per clip, its id, caption and the frames of the real clip, the base and the tuned video.
    """
    v, g = cfg.video, cfg.generate
    (out / "samples").mkdir(exist_ok=True)
    made = []
    for pair in pairs[:NUM_SAMPLE_VIDEOS]:
        caption, cid = pair["meta"]["caption"], pair["key"]
        real = read_frames(workdir / "ingest" / "clips" / f"{cid}.mp4")
        first = real[None, 0] if models.spec.needs_first_frame else None
        videos = {"real": real}
        for name in ("base", "tuned"):
            videos[name] = models.use(name).generate(
                [caption], [cfg.evaluate.seed], num_frames=v.num_frames, height=v.height, width=v.width,
                num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale,
                negative_prompt=g.negative_prompt, first_frames=first, flow_shift=g.flow_shift)[0]
            write_mp4(out / "samples" / f"{cid}-{name}.mp4", videos[name], v.fps)
        made.append({"clip_id": cid, "caption": caption, "videos": videos})
    return made


def build(ctx: StageContext) -> dict[str, Any]:
    cfg, workdir, out = ctx.cfg, ctx.workdir, ctx.out
    models = BaseAndTuned(cfg, workdir)
    pairs = list(iter_pairs(shard_urls(workdir / "shards", "heldout")))
    summary = summarize(pair_errors(models.use, pairs, cfg.evaluate.timesteps, cfg.evaluate.seed))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))

    train_metrics = read_metrics(workdir / "train" / "metrics.jsonl")
    train_record = json.loads((workdir / "train" / "stage.json").read_text())
    plots = [plot_training_curves(train_metrics, out / "training_curves.png").name,
             plot_denoise_error(summary, out / "denoise_error.png").name]
    samples = _samples(models, cfg, workdir, pairs, out)
    if samples:
        plots.append(plot_sample_frames(samples, out / "samples.png").name)
    write_report(out, summary, train_record.get("summary", {}), train_metrics[-1] if train_metrics else None,
                 plots, [(s["clip_id"], s["caption"]) for s in samples])
    return {"num_pairs": summary["num_pairs"], "implicit_acc": summary["implicit_acc"],
            "win_gap": summary["win_gap"], "lose_gap": summary["lose_gap"]}
