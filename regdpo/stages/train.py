"""Train stage: Reg-DPO on the train split of the pair shards.

Reads shards/; writes train/metrics.jsonl, train/checkpoints/step-NNNNNN/, train/final/.
Runs in this process, or launches torchrun itself for `train.num_processes > 1`, or (under an
outer torchrun, `python -m regdpo.train.launch CONFIG`) trains in every process of it.

Where a run starts (decided here, before any process trains; regdpo/train/lineage.py says
when a checkpoint continues):
1. an interrupted run (the runner hands back its partial folder) is resumed when it started
   with this very fingerprint, also under `force` (resuming is exact: the result is the one a
   fresh run gives), unless `train.resume: fresh` and it was itself a continuation;
   with other settings it is continued if its checkpoint continues in this lineage and the
   run is neither forced nor `resume: fresh`;
2. otherwise the published train/ is continued (its latest checkpoint, metrics and
   reference tables are linked into the new run) when its checkpoint continues in this
   lineage: max_steps raised (no restart at step 0), or the shard set grew (a new segment
   over all pairs, max_steps more steps), unless forced or `resume: fresh`;
3. otherwise training starts fresh at step 0.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from regdpo.stages.runner import StageContext
from regdpo.train.checkpoint import TrainState, latest_checkpoint
from regdpo.train.lineage import continuation, lineage_of
from regdpo.train.loader import PairSource

log = logging.getLogger("regdpo.train")


def build(ctx: StageContext) -> dict[str, Any]:
    from regdpo.models import load_model  # lazy: torch/diffusers are heavy
    from regdpo.train import launch

    cfg = ctx.cfg
    shards = ctx.workdir / "shards"
    source = PairSource.from_index(shards, "train")
    lineage = lineage_of(cfg, load_model(cfg.model))  # loads no weights
    start = prepare(ctx, lineage, source)
    log.info("train: %s", start)
    plan = {"config": cfg.model_dump(mode="json"), "out": str(ctx.out), "shards": str(shards)}
    summary = launch.run_plan(plan)
    return {**summary, "start": start}


def prepare(ctx: StageContext, lineage: str, source: PairSource) -> str:
    """Make ctx.out hold what the run continues from (or nothing); say what was chosen."""
    tc = ctx.cfg.train
    own = latest_checkpoint(ctx.out / "checkpoints")
    if own is not None:
        how = continuation(own, lineage, source)
        state = TrainState.read(own)
        same_run = ctx.interrupted_fingerprint == ctx.fingerprint
        if same_run and how in ("same", "grew") and (tc.resume == "continue" or len(state.history) == 1):
            return f"resuming the interrupted run from {own.name}"
        if not ctx.force and tc.resume == "continue" and _fits(how, state, tc.max_steps):
            return f"continuing the interrupted run from {own.name} ({_what(how)})"
        _clear(ctx.out)
    if ctx.previous is not None and not ctx.force and tc.resume == "continue":
        prev = latest_checkpoint(ctx.previous / "checkpoints")
        if prev is not None:
            how = continuation(prev, lineage, source)
            if _fits(how, TrainState.read(prev), tc.max_steps):
                _link_previous(ctx.previous, prev, ctx.out)
                return f"continuing the published run from {prev.name} ({_what(how)})"
            log.info("train: the published run cannot be continued (%s): starting fresh", _reason(how, prev))
    return "starting fresh at step 0"


def _fits(how: str, state: TrainState, max_steps: int) -> bool:
    if how == "grew":
        return True
    return how == "same" and state.step - state.segment_start <= max_steps


def _what(how: str) -> str:
    return "same shard set" if how == "same" else "the shard set grew: a new segment over all pairs"


def _reason(how: str, checkpoint: Path) -> str:
    return how if how not in ("same", "grew") else f"{checkpoint.name} is past train.max_steps"


def _clear(out: Path) -> None:
    for item in out.iterdir():
        if item.name != "partial.json":  # the runner's marker
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def _link_previous(previous: Path, checkpoint: Path, out: Path) -> None:
    """The published run's latest checkpoint, metrics and reference tables, into `out`.

    Checkpoint and table files are never modified in place (new ones are written and renamed),
    so hard links are safe and cost no space; metrics.jsonl is appended to, so it is copied."""
    _clear(out)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name, copy_function=_link)
    for name in ("reference", "tensorboard"):
        if (previous / name).is_dir():
            shutil.copytree(previous / name, out / name, copy_function=_link)
    if (previous / "metrics.jsonl").is_file():
        shutil.copy2(previous / "metrics.jsonl", out / "metrics.jsonl")


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)

