"""The pipeline stages as plain functions, usable from a notebook, torchrun or a flow.

    run(cfg, "generate")                       # plan, do pending units on local devices, publish
    plan = plan(cfg, "generate")               # unit stages: what a run would do, in work items
    run_work_item(cfg, plan.work_items[0])     # any process/machine that sees the workdir
    with workdir_lock(cfg.workdir): publish(cfg, plan)

Stages are declared once in `registry.py`. A unit stage's module (ingest, generate, encode)
exposes `UNITS` (a units.UnitStage); a whole stage's (train, evaluate) exposes
`build(ctx: StageContext) -> dict`. Modules are imported on first use, so importing this
package (e.g. for `regdpo status`) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from regdpo.config import Config, path_problems
from regdpo.stages.lock import WorkdirLocked, workdir_lock
from regdpo.stages.registry import STAGE, STAGES, Stage, get_stage
from regdpo.stages.runner import (
    StageContext,
    StageInputError,
    StageResult,
    missing_input,
    plan_stage,
    publish_stage,
    read_stage_record,
    run_stage,
    stage_state,
)
from regdpo.stages.units import StagePlan, WorkItem

__all__ = ["STAGE", "STAGES", "DevicePool", "Stage", "StageContext", "StageInputError", "StagePlan", "StageResult",
           "WorkItem", "WorkdirLocked", "check_inputs", "get_impl", "get_stage", "order", "plan", "publish", "run",
           "run_work_item", "stage_state", "workdir_lock"]


def get_impl(name: str) -> Any:
    """Stage `name`'s implementation: `UNITS` of a unit stage, `build` of a whole stage."""
    stage = get_stage(name)
    module = importlib.import_module(f"regdpo.stages.{name}")
    return module.UNITS if stage.units else module.build


def run(cfg: Config, name: str, *, force: bool = False, pool: Any = None, command: str | None = None) -> StageResult:
    """Run one stage unless it is current (see `runner.run_stage`): a unit stage's work items
    go to `pool.map(items)` (default: a DevicePool over the stage's devices)."""
    return run_stage(cfg, name, force=force, pool=pool, command=command)


def plan(cfg: Config, name: str, *, force: bool = False) -> StagePlan:
    """A unit stage's plan: `.skipped`, `.work_items` (JSON-able via to_dict), `.counts`."""
    return plan_stage(cfg, name, force=force)


def run_work_item(cfg: Config, item: WorkItem | dict, device: str | None = None) -> dict[str, int]:
    """Do one work item in this process (opening the stage's worker for `device`); idempotent:
    units already finished are skipped. Needs no lock: it writes only into the staging area."""
    from regdpo.stages.units import process_item

    item = WorkItem.from_dict(item) if isinstance(item, dict) else item
    worker = get_impl(item.stage).open_worker(cfg, Path(cfg.workdir), device)
    try:
        return process_item(worker, item, Path(cfg.workdir))
    finally:
        worker.close()


def publish(cfg: Config, plan: StagePlan, *, seconds: float = 0.0) -> StageResult:
    """Publish a unit stage after its work items ran (hold `workdir_lock(cfg.workdir)`)."""
    return publish_stage(cfg, plan, seconds=seconds)


def __getattr__(name: str) -> Any:
    if name == "DevicePool":  # imports multiprocessing machinery only when asked for
        from regdpo.stages.parallel import DevicePool

        return DevicePool
    raise AttributeError(name)


def order(names: Iterable[str] | None) -> list[str]:
    """The requested stages in pipeline order (all of them for None); unknown names raise ValueError."""
    if names is None:
        return list(STAGES)
    wanted = set(names)
    unknown = sorted(wanted - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; choose from {', '.join(STAGES)}")
    if not wanted:
        raise ValueError(f"no stages requested; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def check_inputs(cfg: Config, names: Iterable[str]) -> None:
    """Fail before anything runs if a requested stage cannot start, naming every problem at once.

    - a requested stage reads a stage that is neither on disk nor requested ("run X first");
    - ingest is requested and its manifest (file or folder) does not exist;
    - a requested stage uses the model and `model.path` is not a model directory;
    - evaluate is requested and there will be no held-out pairs.
    Checking up front means `--stage generate` on an empty workdir, or a typo in the model
    path, fails in milliseconds, not after earlier requested stages have spent hours.
    """
    requested = order(set(names))
    problems = path_problems(cfg.ingest.manifest if "ingest" in requested else None,
                             cfg.model.path if any(STAGE[n].reads_model for n in requested) else None)
    if "evaluate" in requested:
        problems += _heldout_problems(cfg, requested)
    problems += [str(missing_input(name, up, cfg.workdir)) for name in requested for up in STAGE[name].inputs
                 if up not in requested and read_stage_record(cfg.workdir, up) is None]
    if len(problems) == 1:
        raise StageInputError(problems[0])
    if problems:
        raise StageInputError(f"{len(problems)} problems, before any stage ran:\n" + "\n".join(f"  - {p}" for p in problems))


def _heldout_problems(cfg: Config, requested: list[str]) -> list[str]:
    """evaluate measures held-out pairs: make sure there will be some before anything runs."""
    if cfg.ingest.heldout_fraction == 0 and cfg.ingest.min_heldout == 0:
        return ["evaluate needs held-out clips, but ingest.heldout_fraction and ingest.min_heldout are both 0: set "
                "ingest.min_heldout >= 1 (or heldout_fraction > 0), or leave evaluate out of the run"]
    if "encode" not in requested:
        index = Path(cfg.workdir) / "shards" / "index.json"
        if index.is_file():
            import json

            splits = json.loads(index.read_text()).get("splits", {})
            if not splits.get("heldout", {}).get("num_samples"):
                return [f"evaluate needs held-out pairs, but {index} has none: rerun ingest and encode with "
                        "ingest.min_heldout >= 1"]
    return []
