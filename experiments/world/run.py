"""The world experiment, one command (experiments/world/README.md):

    .venv/bin/python -m experiments.world                 # the measured wall and CPU times: docs/EXPERIMENT.md

1. Two worlds of clips (regdpo.world): one the base model trains on, one it never sees, for
   GT-Pair (its held-out part gives the evaluation captions).
2. The base model: a small Wan 2.1 text-to-video model trained from scratch on the first world
   (base_model.py), cached under --cache by its settings, clips and code.
3. The pipeline's own stages on the second world: ingest, the base model's negatives, encode.
4. Variants (dpo, reg-dpo with r = DGR and 2·DGR, a constant r, sft): each the pipeline's train
   and evaluate stages on a copy of that workdir; evaluate scores 64 held-out captions' samples
   of base and tuned with the world's quality score.
5. The table, figures and claim checks (results.py) into --docs.
Writes the workdirs under --out (deleted first). Every phase's wall and CPU time is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from experiments.runs import VARIANTS, Clock, cpu_seconds, dirname, make_config, quiet_worker, run_variants
from experiments.world.base_model import BaseSettings, build_base

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "config.yaml"
WORLD_VARIANTS = ("dpo", "reg-dpo", "reg-dpo-2dgr", "reg-dpo-r50", "sft")
BASE_WORLD = {"seed": 0, "num_clips": 3000}  # what the base model trains on
TUNE_WORLD = {"seed": 1, "num_clips": 320}  # GT-Pair clips the base never saw (a fifth held out)


def worlds(cache: Path, spec, base_clips: int, tune_clips: int) -> tuple[Path, Path]:
    """The two worlds' manifests (cached: a world folder is reused when it holds the same world)."""
    from regdpo.world import write_world

    size = f"{spec.size}px-{spec.num_frames}f"
    base = write_world(cache / f"world-s{BASE_WORLD['seed']}-{size}-{base_clips}", base_clips,
                       seed=BASE_WORLD["seed"], spec=spec)
    tune = write_world(cache / f"world-s{TUNE_WORLD['seed']}-{size}-{tune_clips}", tune_clips,
                       seed=TUNE_WORLD["seed"], spec=spec)
    return base, tune


def prepare(root: Path, base_model: Path, extra: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """ingest, generate (the base model's negatives) and encode on the tuning world, and what a
    perfect denoiser could reach: the world score of the held-out clips through the VAE."""
    from experiments.model_prep import pair_spread
    from regdpo.stages import run

    workdir = root / "prepare"
    cfg = make_config(CONFIG, workdir, extra, base_model)
    ingest = run(cfg, "ingest").summary
    for stage in ("generate", "encode"):
        run(cfg, stage)
    facts = {"num_clips": ingest["num_clips"], "num_train": ingest["num_train"], "num_heldout": ingest["num_heldout"],
             "pairs": pair_spread(workdir / "shards"), "vae_round_trip": vae_round_trip(cfg, workdir)}
    return workdir, facts


def vae_round_trip(cfg, workdir: Path) -> dict[str, Any]:
    """World score of the evaluated held-out clips after encode + decode (the ceiling of any
    sample: the base model's decoder draws every video), with its interval."""
    import numpy as np
    import pandas as pd

    from regdpo.data.video import read_frames
    from regdpo.eval.stats import mean_interval
    from regdpo.models import load_model
    from regdpo.world.score import score_video

    clips = pd.read_parquet(workdir / "ingest" / "clips.parquet")
    held = clips[clips.split == "heldout"].head(cfg.evaluate.samples.num_samples)
    spec = load_model(cfg.model)
    scores = []
    for clip_id, caption in zip(held.clip_id, held.caption):
        video = read_frames(workdir / "ingest" / "clips" / f"{clip_id}.mp4")
        scores.append(score_video(spec.decode(spec.encode_video(video[None]))[0], caption, cfg.video.fps)["score"])
    return mean_interval(np.array(scores)).as_dict()


def base_settings(settings: BaseSettings, sets: list[str], parser: argparse.ArgumentParser) -> BaseSettings:
    """`settings` with each KEY=VALUE of --base, the value cast to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    changes: dict[str, Any] = {}
    for item in sets:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            parser.error(f"--base {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        changes[key] = type(getattr(settings, key))(yaml.safe_load(value))
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "world", help="workdirs (deleted first)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "world-cache",
                        help="world clips and base models, reused across runs")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "experiment-world",
                        help="table, figures, results.md")
    parser.add_argument("--variants", default=",".join(WORLD_VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps of every variant (default: config)")
    parser.add_argument("--base-clips", type=int, default=BASE_WORLD["num_clips"])
    parser.add_argument("--tune-clips", type=int, default=TUNE_WORLD["num_clips"])
    parser.add_argument("--quick-base", action="store_true", help="a base model of a few steps (smoke tests)")
    parser.add_argument("--base", dest="base_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base model setting (experiments/world/base_model.py BaseSettings), "
                             "e.g. steps=800")
    parser.add_argument("--workers", type=int, default=2,
                        help="variants run side by side, one thread each (0: one after the other in this process)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override the experiment config for every run (e.g. evaluate.samples.num_samples=8)")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    if args.steps is not None:
        extra["train.max_steps"] = args.steps

    from regdpo.config import load_config
    from regdpo.world import WorldSpec

    video = load_config(CONFIG, {k: v for k, v in extra.items() if k.startswith("video.")}).video
    if video.height != video.width:
        parser.error("the world's frames are square: set video.height and video.width alike")
    spec = WorldSpec(size=video.height, num_frames=video.num_frames, fps=video.fps)
    clock = Clock()
    root, cache = args.out.resolve(), args.cache.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    load = os.getloadavg()

    # One thread from here on, the base model's training included: the same numbers on any machine
    # (reductions split across threads round differently), and no threads spinning for one another
    # on a busy machine.
    quiet_worker()
    t, c = time.perf_counter(), cpu_seconds()
    base_manifest, tune_manifest = worlds(cache, spec, args.base_clips, args.tune_clips)
    clock.done("world clips", t, c)
    t, c = time.perf_counter(), cpu_seconds()
    settings = base_settings(BaseSettings(max_sequence_length=load_config(CONFIG).model.max_sequence_length),
                             args.base_sets, parser)
    base_model, base_facts = build_base(base_manifest, cache, settings.quick() if args.quick_base else settings)
    clock.done("base model" + (" (cached)" if base_facts["cached"] else ""), t, c)

    extra = {"ingest.manifest": str(tune_manifest), **extra}
    t, c = time.perf_counter(), cpu_seconds()
    base, facts = prepare(root, base_model, extra)
    clock.done("ingest, negatives of the base model, encode", t, c)

    t, c = time.perf_counter(), cpu_seconds()
    jobs = {n: dict(name=n, base_yaml=str(CONFIG), base=str(base), workdir=str(root / "variants" / dirname(n)),
                    model_path=str(base_model), extra=extra, train=VARIANTS[n]) for n in names}
    results = run_variants(jobs, args.workers)
    clock.done(f"{len(names)} variants (train + evaluate, {max(args.workers, 1)} side by side)", t, c)

    from experiments.world.results import write_results

    t, c = time.perf_counter(), cpu_seconds()
    facts.update(base_model=base_facts, base_model_dir=str(base_model), load_at_start=[round(x, 2) for x in load],
                 load_at_end=[round(x, 2) for x in os.getloadavg()], worlds={"base": str(base_manifest),
                                                                           "tune": str(tune_manifest)})
    runs = {n: root / "variants" / dirname(n) for n in names}
    written = write_results(runs, args.docs.resolve(), facts, clock, make_config(CONFIG, base, extra, base_model))
    clock.done("tables and figures", t, c)
    print(f"total: {clock.total} s wall, {clock.total_cpu} s CPU; results: {written}", flush=True)
    return {"facts": facts, "variants": results, "seconds": clock.total, "cpu_seconds": clock.total_cpu,
            "results": str(written)}


if __name__ == "__main__":
    main()
