"""What the experiments share: configs with overrides, the variants (objective and r), running
each variant's train and evaluate stages on a copy of one prepared workdir, and a clock that
records wall and CPU time per phase."""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

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
DATA_STAGES = ("ingest", "negatives", "shards")


def dirname(name: str) -> str:
    return name.replace("/", "_")


def make_config(base_yaml: Path, workdir: Path, extra: dict[str, Any], model_path: Path | None = None,
                train: dict[str, Any] | None = None):
    """`base_yaml` with the workdir, `extra` (dotted keys), a model directory instead of the
    preset, and train-section overrides."""
    from regdpo.config import load_config

    overrides: dict[str, Any] = {"workdir": str(workdir), **extra}
    if model_path is not None:
        overrides.update({"model.preset": None, "model.path": str(model_path)})
    overrides.update({f"train.{k}": v for k, v in (train or {}).items()})
    return load_config(base_yaml, overrides)


def copy_stages(src: Path, dst: Path, names: Iterable[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(src / name, dst / name)


def quiet_worker() -> None:
    # Small models' matrices gain little from threads, and on a shared 2-core machine threads of
    # parallel runs fight: one thread per process, runs side by side.
    import torch

    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)


def run_variant(name: str, base_yaml: str, base: str, workdir: str, model_path: str | None, extra: dict[str, Any],
                train: dict[str, Any]) -> dict[str, Any]:
    """One variant: a copy of the base workdir's data stages, then train and evaluate."""
    from regdpo.stages import run

    start, cpu = time.perf_counter(), time.process_time()
    wd = Path(workdir)
    shutil.rmtree(wd, ignore_errors=True)
    copy_stages(Path(base), wd, DATA_STAGES)
    cfg = make_config(Path(base_yaml), wd, extra, Path(model_path) if model_path else None, train)
    out = {"name": name, "train": run(cfg, "train").summary}
    out["evaluate"] = run(cfg, "evaluate").summary
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["cpu_seconds"] = round(time.process_time() - cpu, 1)
    return out


def run_variants(jobs: dict[str, dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Every job (run_variant's keyword arguments), `workers` side by side in fresh processes
    (0: one after the other in this process); prints one line per finished variant."""
    if workers == 0:
        outcomes = (run_variant(**kw) for kw in jobs.values())
        return [_report(r) for r in outcomes]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=quiet_worker) as pool:
        futures = [pool.submit(run_variant, **kw) for kw in jobs.values()]
        return [_report(f.result()) for f in futures]


def _report(res: dict[str, Any]) -> dict[str, Any]:
    print(f"  {res['name']}: {res['seconds']}s  {res['evaluate'].get('verdicts', {})}", flush=True)
    return res


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU (user + sys, children included) seconds per phase."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), cpu_seconds()
        self.phases: list[tuple[str, float]] = []
        self.cpu: list[tuple[str, float]] = []

    def done(self, phase: str, t0: float, cpu0: float | None = None) -> None:
        seconds = time.perf_counter() - t0
        self.phases.append((phase, round(seconds, 1)))
        if cpu0 is not None:
            self.cpu.append((phase, round(cpu_seconds() - cpu0, 1)))
        print(f"[{time.perf_counter() - self.start:7.1f}s] {phase}: {seconds:.1f}s", flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    @property
    def total_cpu(self) -> float:
        return round(cpu_seconds() - self.cpu_start, 1)
