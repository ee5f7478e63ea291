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
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).resolve().parent / "config.yaml"

# name -> overrides of the train section; everything else is shared
VARIANTS: dict[str, dict[str, Any]] = {
    "dpo": {"objective": "dpo"},
    "reg-dpo": {"objective": "reg-dpo", "r_mode": "dgr", "r_scale": 1.0},
    "sft": {"objective": "sft"},
    "reg-dpo-dgr/5": {"objective": "reg-dpo", "r_mode": "dgr", "r_scale": 0.2},
    "reg-dpo-dgr/2": {"objective": "reg-dpo", "r_mode": "dgr", "r_scale": 0.5},
    "reg-dpo-2dgr": {"objective": "reg-dpo", "r_mode": "dgr", "r_scale": 2.0},
    "reg-dpo-r50": {"objective": "reg-dpo", "r_mode": "constant", "r_constant": 50.0},
    "reg-dpo-r500": {"objective": "reg-dpo", "r_mode": "constant", "r_constant": 500.0},
}
WARMUP = {"objective": "sft", "finetune": "full", "max_steps": 1000}


def _dirname(name: str) -> str:
    return name.replace("/", "_")


def _config(workdir: Path, extra: dict[str, Any], model_path: Path | None = None, train: dict[str, Any] | None = None):
    from regdpo.config import load_config

    overrides: dict[str, Any] = {"workdir": str(workdir), **extra}
    if model_path is not None:
        overrides.update({"model.preset": None, "model.path": str(model_path)})
    overrides.update({f"train.{k}": v for k, v in (train or {}).items()})
    return load_config(CONFIG, overrides)


def _copy_stages(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(src / name, dst / name)


def _quiet_worker() -> None:
    # The tiny model's matrices are too small to gain from threads, and on a shared 2-core
    # machine threads of parallel runs fight: one thread per process, runs side by side.
    import torch

    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)


def run_variant(name: str, base: str, workdir: str, model_path: str | None, extra: dict[str, Any],
                train: dict[str, Any]) -> dict[str, Any]:
    """One variant: a copy of the base workdir's data stages, then train and evaluate."""
    from regdpo.stages import run

    start = time.perf_counter()
    wd = Path(workdir)
    shutil.rmtree(wd, ignore_errors=True)
    _copy_stages(Path(base), wd, ("ingest", "negatives", "shards"))
    cfg = _config(wd, extra, Path(model_path) if model_path else None, train)
    out = {"name": name, "train": run(cfg, "train").summary}
    out["evaluate"] = run(cfg, "evaluate").summary
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _report_each(outcomes) -> list[dict[str, Any]]:
    results = []
    for res in outcomes:
        print(f"  {res['name']}: {res['seconds']}s  {res['evaluate'].get('verdicts', {})}", flush=True)
        results.append(res)
    return results


class Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def done(self, phase: str, t0: float) -> None:
        seconds = time.perf_counter() - t0
        self.phases.append((phase, round(seconds, 1)))
        print(f"[{time.perf_counter() - self.start:7.1f}s] {phase}: {seconds:.1f}s", flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


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
    _copy_stages(prep, base, ("ingest",))
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

    _quiet_worker()
    clock = Clock()
    root = args.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base, model, facts = prepare(root, extra, 0 if args.no_warmup else args.warmup_steps, not args.no_calibration,
                                 clock)
    facts["model"] = {"calibrated": not args.no_calibration, "warmup_steps": 0 if args.no_warmup else args.warmup_steps}

    t = time.perf_counter()
    jobs = {n: dict(name=n, base=str(base), workdir=str(root / "variants" / _dirname(n)),
                    model_path=str(model) if model else None, extra=extra, train=VARIANTS[n]) for n in names}
    results = []
    if args.workers == 0:  # in this process, one after the other (debugging, tests)
        outcomes = (run_variant(**kw) for kw in jobs.values())
        results = _report_each(outcomes)
    else:
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"),
                                 initializer=_quiet_worker) as pool:
            futures = [pool.submit(run_variant, **kw) for kw in jobs.values()]
            results = _report_each(f.result() for f in futures)
    clock.done(f"{len(names)} variants (train + evaluate, {args.workers} side by side)", t)

    from experiments.write_results import write_results

    t = time.perf_counter()
    runs = {n: root / "variants" / _dirname(n) for n in names}
    written = write_results(runs, args.docs.resolve(), facts, clock.phases, _config(base, extra, model))
    clock.done("tables and figures", t)
    print(f"total: {clock.total}s; results: {written}", flush=True)
    return {"facts": facts, "variants": results, "seconds": clock.total, "results": str(written)}


if __name__ == "__main__":
    main()
