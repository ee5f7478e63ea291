"""The pipeline stages as plain functions: `run(cfg, "train")` from a notebook, torchrun or a flow.

Stages are declared once in `registry.py`; each lives in `regdpo/stages/<name>.py` and exposes
`build(ctx: StageContext) -> dict` (the contract in `runner.py`). Builders are imported on first use, so importing this package
(e.g. for `regdpo status`) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from regdpo.config import Config
from regdpo.stages.registry import STAGE, STAGES, Stage, get_stage
from regdpo.stages.runner import (
    BuildFn,
    StageInputError,
    StageResult,
    missing_input,
    read_stage_record,
    run_stage,
)

__all__ = ["STAGE", "STAGES", "Stage", "StageInputError", "StageResult", "check_inputs", "get_builder", "get_stage",
           "order", "run"]


def get_builder(name: str) -> BuildFn:
    """The `build` function of stage `name`, importing its module now."""
    get_stage(name)
    return importlib.import_module(f"regdpo.stages.{name}").build


def run(cfg: Config, name: str, *, force: bool = False) -> StageResult:
    """Run one stage unless it is current (see `runner.run_stage`)."""
    return run_stage(cfg, name, get_builder(name), force=force)


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
    """Fail before anything runs if a requested stage reads a stage that is neither on disk nor requested.

    The runner checks the same thing per stage; checking up front means `--stage generate` on an
    empty workdir fails in milliseconds, not after earlier requested stages have spent hours.
    """
    requested = set(names)
    for name in order(requested):
        for up in STAGE[name].inputs:
            if up not in requested and read_stage_record(cfg.workdir, up) is None:
                raise missing_input(name, up, cfg.workdir)
