"""The reproduction experiment, one command (experiments/README.md):

    .venv/bin/python -m experiments.reproduce            # ~15 min on a 2-core CPU

On the sample clips, with a small model (the tiny preset, latents calibrated, denoiser warmed up
with SFT; see model_prep.py), the same data, seeds and β for every variant: dpo, reg-dpo with
r = DGR, sft, reg-dpo with r = DGR/5, DGR/2, 2·DGR, and two constant r. Each variant is the
pipeline's own train and evaluate stages on a copy of one shared workdir (ingest, negatives,
shards). Writes the workdirs under --out (default runs/experiment, started afresh) and the
table, figures and claim checks into --docs (default docs/experiment).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from experiments.runs import VARIANTS, Clock, copy_stages, dirname, make_config, quiet_worker, run_variants

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).resolve().parent / "config.yaml"
WARMUP = {"objective": "sft", "finetune": "full", "max_steps": 1000}


def _config(workdir: Path, extra: dict[str, Any], model_path: Path | None = None, train: dict[str, Any] | None = None):
    return make_config(CONFIG, workdir, extra, model_path, train)


def prepare(root: Path, extra: dict[str, Any], warmup_steps: int, calibrated: bool, clock: Clock
            ) -> tuple[Path, Path | None, dict[str, Any]]:
    """ingest -> calibrated model -> SFT warm-up -> warm model -> its negatives and shards.
    Returns the base workdir (ingest, negatives, shards of the final model), that model's
    directory (None: the tiny preset itself) and facts for the record."""
    from experiments.model_prep import calibrate, pair_spread, warm_up_directory
    from regdpo.stages import run

    facts: dict[str, Any] = {}
    prep, models, base = root / "prepare", root / "models", root / "base"
    t = time.perf_counter()
    run(_config(prep, extra), "ingest")
    clock.done("ingest", t)
    model: Path | None = None
    if calibrated:
        t = time.perf_counter()
        model = models / "calibrated"
        facts["calibration"] = calibrate(_config(prep, extra), prep, model)
        clock.done("calibrate latents", t)
    if warmup_steps > 0:
        t = time.perf_counter()
        cold = _config(prep, extra, model, {**WARMUP, "max_steps": warmup_steps})
        for stage in ("generate", "encode", "train"):
            run(cold, stage)
        facts["pairs_before_warmup"] = pair_spread(prep / "shards")
        rows = [json.loads(ln) for ln in (prep / "train" / "metrics.jsonl").read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 10):]
        facts["warmup"] = {"steps": len(rows), "err_real_start": rows[0]["err_w"],
                           "err_real_end": sum(r["err_w"] for r in tail) / len(tail)}
        model = warm_up_directory(cold, prep, models / "warm")
        clock.done("SFT warm-up", t)
    t = time.perf_counter()
    copy_stages(prep, base, ("ingest",))
    final = _config(base, extra, model)
    for stage in ("generate", "encode"):
        run(final, stage)
    facts["pairs"] = pair_spread(base / "shards")
    clock.done("negatives of the model to tune", t)
    return base, model, facts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "experiment", help="workdirs (deleted first)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "experiment", help="table, figures, results.md")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps of every variant (default: config)")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP["max_steps"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--no-warmup", action="store_true", help="tune the (calibrated) preset from its random init")
    parser.add_argument("--no-calibration", action="store_true", help="keep the preset's latent normalisation")
    parser.add_argument("--workers", type=int, default=2,
                        help="variants run side by side, one thread each (0: one after the other in this process)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override the experiment config for every run (e.g. video.height=32)")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    if args.steps is not None:
        extra["train.max_steps"] = args.steps

    quiet_worker()
    clock = Clock()
    root = args.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base, model, facts = prepare(root, extra, 0 if args.no_warmup else args.warmup_steps, not args.no_calibration,
                                 clock)
    facts["model"] = {"calibrated": not args.no_calibration, "warmup_steps": 0 if args.no_warmup else args.warmup_steps}

    t = time.perf_counter()
    jobs = {n: dict(name=n, base_yaml=str(CONFIG), base=str(base), workdir=str(root / "variants" / dirname(n)),
                    model_path=str(model) if model else None, extra=extra, train=VARIANTS[n]) for n in names}
    results = run_variants(jobs, args.workers)
    clock.done(f"{len(names)} variants (train + evaluate, {args.workers} side by side)", t)

    from experiments.write_results import write_results

    t = time.perf_counter()
    runs = {n: root / "variants" / dirname(n) for n in names}
    written = write_results(runs, args.docs.resolve(), facts, clock.phases, _config(base, extra, model))
    clock.done("tables and figures", t)
    print(f"total: {clock.total}s; results: {written}", flush=True)
    return {"facts": facts, "variants": results, "seconds": clock.total, "results": str(written)}


if __name__ == "__main__":
    main()
