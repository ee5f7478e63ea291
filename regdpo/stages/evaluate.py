"""Evaluate stage: the tuned model against its base on the held-out pairs; verdicts and a report.

Reads shards/ (heldout split), train/ (final weights, metrics.jsonl, config.yaml) and the
real held-out clips in ingest/clips/. Writes into eval/:
  metrics.json            every number, with intervals and verdicts (regdpo/eval/metrics.py)
  pair_errors.jsonl       the raw denoising errors, one line per (pair, t)
  sample_scores.jsonl     with evaluate.scorers: every scorer's numbers per sample (real, base, tuned)
  report.md, report.html  the report (the HTML embeds its images and the sample video)
  training_curves.png, denoise_error.png, samples.png, samples.mp4
  samples/<clip_id>-{base,tuned}.mp4

Refused before anything is written: a held-out sample key that is not a pair id (keys name
files), non-finite held-out tensors, non-finite weights in train/final, a non-finite error.

Two passes:
1. Errors: the denoiser alone (the pairs are pre-encoded), base and tuned on the same latents,
   timesteps and noise.
2. Samples (loads the VAE and the text encoder): base and tuned generate for the first
   `evaluate.samples.num_samples` held-out captions with the same seed per caption, with
   evaluation's own sampler settings; then the Fréchet distance and temporal consistency
   against the real clips, and the sample scorers (evaluate.scorers) on real, base and tuned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from regdpo.config import Config
from regdpo.data.shards import check_pair_id, iter_pairs, shard_urls
from regdpo.data.video import read_frames, write_mp4
from regdpo.eval.contents import report_blocks
from regdpo.eval.distribution import sample_metrics
from regdpo.eval.features import load_feature_extractor
from regdpo.eval.headline import decide
from regdpo.eval.metrics import latent_separation, pair_errors, summarize
from regdpo.eval.plots import load_metrics, plot_denoise_error, plot_training_curves
from regdpo.eval.report import doc_link, toy_warning, write_report
from regdpo.eval.samples import SampleSet, write_contact_sheet, write_sample_grid
from regdpo.eval.scorers import load_scorers, score_blocks, score_samples
from regdpo.hashing import derive_seed
from regdpo.models.base import LORA_WEIGHT_NAME
from regdpo.progress import ProgressLog
from regdpo.stages.common import load_spec
from regdpo.stages.runner import StageContext

MODELS = ("base", "tuned")
log = logging.getLogger(__name__)
MAX_SHOWN = 8  # samples drawn in samples.png and samples.mp4


class BaseAndTuned:
    """The base and the tuned denoiser over one spec: `use("base" | "tuned")` binds one.

    LoRA runs load train/final into one denoiser and toggle its adapters (off = the base
    weights exactly, no second copy); full fine-tuning loads train/final/transformer beside a
    fresh base denoiser. Only denoisers are built here.
    """

    def __init__(self, spec, cfg: Config, workdir: Path):
        self.spec = spec
        final = workdir / "train" / "final"
        base = spec.load_denoiser()
        self.lora = cfg.train.finetune == "lora"
        if self.lora:
            if not (final / LORA_WEIGHT_NAME).is_file():
                raise FileNotFoundError(f"{final / LORA_WEIGHT_NAME} not found: run train first")
            spec.add_lora(base, cfg.train.lora)
            spec.load_lora(base, final)
            self._models = {"base": base, "tuned": base}
        else:
            path = final / "transformer"
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} holds no transformer: run train first (train.finetune: full)")
            tuned = type(base).from_pretrained(str(path), torch_dtype=spec.dtype, local_files_only=True)
            self._models = {"base": base, "tuned": tuned.to(spec.device).eval()}
        _check_final(final, self.lora)

    @property
    def num_parameters(self) -> int:
        """The base denoiser's size (LoRA weights not counted)."""
        return sum(p.numel() for n, p in self._models["base"].named_parameters() if "lora_" not in n)

    def use(self, which: str):
        if which not in MODELS:
            raise ValueError(f"use() takes 'base' or 'tuned', got {which!r}")
        denoiser = self._models[which]
        if self.lora:
            self.spec.set_adapters_enabled(denoiser, which == "tuned")
        return self.spec.bind(denoiser)

    def describe(self) -> dict[str, str]:
        if self.lora:
            return {"base": "the base weights (train/final's LoRA adapters switched off)",
                    "tuned": "the base weights + the LoRA in train/final"}
        return {"base": "the base weights", "tuned": "the full transformer in train/final/transformer"}


def _check_final(final: Path, lora: bool) -> None:
    """train/final's weights are finite (a NaN there would be published as NaN metrics)."""
    from safetensors import safe_open

    files = [final / LORA_WEIGHT_NAME] if lora else sorted((final / "transformer").glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not t.isfinite().all():
                    raise ValueError(f"{path}: tensor {name} holds non-finite values, so train/final is unusable: "
                                     "retrain it (regdpo run CONFIG --stage train --force)")


def heldout_pairs(shards: Path) -> list[dict[str, Any]]:
    """Every held-out pair, refused before any use unless its key is a pair id (it names files:
    samples/<key>-base.mp4) and its tensors are finite. Each pair also carries its "shard"."""
    pairs = []
    for url in shard_urls(shards, "heldout"):
        for pair in iter_pairs([url]):
            key = check_pair_id(pair["key"], f"{url}: held-out sample")
            bad = [n for n, t in pair.items() if hasattr(t, "is_floating_point") and t.is_floating_point()
                   and not t.isfinite().all()]
            if bad:
                raise ValueError(f"{url}: held-out pair {key} holds non-finite values in {', '.join(sorted(bad))}: "
                                 "rerun encode for it (regdpo run CONFIG --stage encode --force)")
            pairs.append({**pair, "shard": url})
    return pairs


def check_errors(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> None:
    """Every held-out denoising error is finite; else the pair is named (never NaN metrics)."""
    shard = {p["key"]: p["shard"] for p in pairs}
    for row in rows:
        bad = {k: v for k, v in row.items() if k.startswith("err_") and not np.isfinite(v)}
        if bad:
            names = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise ValueError(f"{shard.get(row['key'], 'shards')}: held-out pair {row['key']} at t = {row['t']} gives a "
                             f"non-finite error ({names}) though its inputs and train/final are finite: a prediction "
                             "overflowed; use model.dtype float32")


def sample_seed(seed: int, clip_id: str) -> int:
    """The sampling seed of a held-out caption: the same for base and tuned, independent of
    which other captions are sampled, and different from the seed of its negative."""
    return derive_seed("evaluate", seed, clip_id, bits=31)


def _generate_samples(models: BaseAndTuned, cfg: Config, workdir: Path, pairs: list[dict[str, Any]], out: Path
                      ) -> list[SampleSet]:
    """Base and tuned videos for the first held-out captions (eval/samples/<id>-{base,tuned}.mp4)."""
    s, v = cfg.evaluate.samples, cfg.video
    # One sample per held-out clip: with generate.num_negatives K > 1 a clip has K pairs
    # (<clip_id>_k<k>), all with its caption and its real clip.
    by_clip = {}
    for p in pairs:
        cid = check_pair_id(str(p["meta"].get("clip_id", p["key"])), f"{p['shard']}: held-out pair {p['key']} clip_id")
        by_clip.setdefault(cid, p)
    chosen = list(by_clip.values())[: s.num_samples]
    if not chosen:
        return []
    (out / "samples").mkdir(exist_ok=True)
    ids = list(by_clip)[: s.num_samples]
    captions = [p["meta"]["caption"] for p in chosen]
    seeds = [sample_seed(s.seed, cid) for cid in ids]
    real = [read_frames(workdir / "ingest" / "clips" / f"{cid}.mp4") for cid in ids]
    videos: dict[str, list[np.ndarray]] = {}
    batch = cfg.generate.batch_size
    progress = ProgressLog(log, "evaluate: samples", 2 * len(chosen), unit="videos")
    with tqdm(total=2 * len(chosen), desc="evaluate samples", unit="video") as bar:
        for name in MODELS:
            videos[name] = []
            for i in range(0, len(chosen), batch):
                first = np.stack([r[0] for r in real[i:i + batch]]) if models.spec.needs_first_frame else None
                videos[name] += list(models.use(name).generate(
                    captions[i:i + batch], seeds[i:i + batch], num_frames=v.num_frames, height=v.height,
                    width=v.width, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                    negative_prompt=s.negative_prompt, first_frames=first, flow_shift=s.flow_shift))
                bar.update(len(captions[i:i + batch]))
                progress.update(len(captions[i:i + batch]))
    sets = []
    for i, cid in enumerate(ids):
        for name in MODELS:
            write_mp4(out / "samples" / f"{cid}-{name}.mp4", videos[name][i], v.fps)
        sets.append(SampleSet(cid, captions[i], seeds[i], {"real": real[i], **{n: videos[n][i] for n in MODELS}}))
    return sets


def _identical_predictions(rows: list[dict[str, Any]]) -> bool:
    return all(r["err_base_w"] == r["err_tuned_w"] and r["err_base_l"] == r["err_tuned_l"] for r in rows)


def build(ctx: StageContext) -> dict[str, Any]:
    cfg, workdir, out = ctx.cfg, ctx.workdir, ctx.out
    ev = cfg.evaluate
    pairs = heldout_pairs(workdir / "shards")
    if not pairs:
        raise ValueError(f"{workdir / 'shards'}: the heldout split has no pairs; set ingest.min_heldout >= 1 "
                         "(and rerun ingest) to evaluate")
    spec = load_spec(cfg)
    models = BaseAndTuned(spec, cfg, workdir)
    boot = ev.bootstrap
    progress = ProgressLog(log, "evaluate: denoising errors", len(pairs), unit="pairs")
    rows = pair_errors(models.use, pairs, ev.timesteps, ev.seed, progress=progress.update)
    check_errors(rows, pairs)
    (out / "pair_errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows, num_resamples=boot.num_resamples, confidence=boot.confidence, seed=boot.seed)
    summary["models"] = models.describe()
    summary["identical_predictions"] = _identical_predictions(rows)
    summary["latent_separation"] = latent_separation(pairs)

    toy_note = toy_warning(cfg.model.preset, models.num_parameters)
    scorers = load_scorers(ev.scorers, fps=cfg.video.fps)  # a broken scorer fails before any sampling
    sets = _generate_samples(models, cfg, workdir, pairs, out)
    plots = {"training": "training_curves.png", "denoise": "denoise_error.png"}
    files: dict[str, str] = {}
    if sets:
        extractor = load_feature_extractor(ev.feature_extractor, device=str(spec.device))
        m = sample_metrics([s.videos["real"] for s in sets], {n: [s.videos[n] for s in sets] for n in MODELS},
                           extractor, num_resamples=boot.num_resamples, set_resamples=boot.set_resamples,
                           confidence=boot.confidence, seed=boot.seed, min_sets=boot.min_clips_for_sets)
        summary["sample_metrics"] = {k: v for k, v in m.items() if k != "verdicts"}
        summary["verdicts"] = summary["verdicts"] + m["verdicts"]
        note = "toy-sized model: its samples are not expected to look like video" if toy_note else ""
        # every sample is measured; the sheet and the grid show the first few (64 rows are unreadable)
        shown = sets[:MAX_SHOWN]
        plots["samples"] = write_contact_sheet(shown, out / "samples.png", note=note).name
        files["grid"] = write_sample_grid(shown, out / "samples.mp4", cfg.video.fps).name
    if sets and scorers:
        scored = score_samples(scorers, [{"clip_id": s.clip_id, "caption": s.caption, "videos": s.videos} for s in sets],
                               num_resamples=boot.num_resamples, confidence=boot.confidence, seed=boot.seed)
        (out / "sample_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored["rows"]))
        summary["sample_scores"] = {"num_samples": scored["num_samples"], "metrics": scored["metrics"]}
        summary["verdicts"] = summary["verdicts"] + scored["verdicts"]
    train_rows, unread = load_metrics(workdir / "train" / "metrics.jsonl")
    summary["headline"] = decide(summary["verdicts"], train_rows).as_dict()
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))

    plot_training_curves(train_rows, out / plots["training"], title=f"training ({cfg.train.objective})")
    plot_denoise_error(summary, out / plots["denoise"])
    blocks = report_blocks(
        summary=summary, config_yaml=yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
        toy_note=toy_note, beta=cfg.train.beta, train_rows=train_rows, unread_lines=unread, plots=plots,
        samples=[{"clip_id": s.clip_id, "caption": s.caption, "seed": s.seed, "tuned_vs_base": s.tuned_vs_base()}
                 for s in sets], sample_files=files, experiment_doc=doc_link("EXPERIMENT.md", workdir / "eval"))
    if "sample_scores" in summary:
        at = next(i for i, b in enumerate(blocks) if b.kind == "h2" and b.text == "Configuration")
        blocks[at:at] = score_blocks(summary["sample_scores"])
    write_report(out, blocks)
    return {"headline": summary["headline"]["label"], "num_pairs": summary["num_pairs"],
            "implicit_acc": summary["implicit_acc"],
            "win_gap": summary["win_gap"], "lose_gap": summary["lose_gap"],
            "verdicts": {v["metric"]: v["verdict"] for v in summary["verdicts"]}}
