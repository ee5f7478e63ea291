"""Run one stage: skip it when current, otherwise do it and publish atomically.

Two kinds of stage (registry.py):

- Unit stages (ingest, generate, encode): `plan` -> pending work items -> `run_work_item`
  anywhere -> `publish` (units.py). A rerun does only units whose content key is new; the
  stage is current when every wanted unit is published. `force` redoes every unit.
- Whole stages (train, evaluate): `build(ctx)` writes into `<workdir>/.<dir>.partial/`, which is
  swapped with `<workdir>/<dir>/` when complete. Current when `stage.json`'s fingerprint (its
  config sections + its inputs' fingerprints + the model files) matches. `force` redoes it.

Every run holds the workdir lock (lock.py) and first completes any publish a killed run left
committed-but-unapplied (journal.py), so the published state is always one whole version.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regdpo.config import Config, fingerprint_payload, save_resolved
from regdpo.fingerprint import dir_fingerprint
from regdpo.hashing import short_hash
from regdpo.stages.lock import workdir_lock
from regdpo.stages.journal import Transaction, pending_journals, recover
from regdpo.stages.registry import STAGE, STAGES, get_stage
from regdpo.stages.accounting import Progress, failures_line, reason_counts, reasons_text
from regdpo.stages.units import StagePlan, Staging, UnitStage, make_plan, publish_plan

log = logging.getLogger(__name__)

__all__ = ["STAGES", "BuildFn", "StageContext", "StageInputError", "StageResult", "expected_fingerprint",
           "is_current", "model_identity", "plan_stage", "publish_stage", "read_stage_record", "run_stage",
           "stage_dir", "stage_state"]


class StageInputError(RuntimeError):
    """A stage's inputs are missing or stale; the message says which stage to run first."""

    transient = False  # regdpo/errors.py: running it again changes nothing


@dataclass(frozen=True)
class StageContext:
    """What a whole stage's `build` gets: the config, the workdir, the fresh (or resumed) partial
    folder to write into, whether the run was forced, and the currently published output of
    this stage (None when there is none), which a resumable stage may continue from."""

    cfg: Config
    workdir: Path
    out: Path
    force: bool = False
    previous: Path | None = None
    fingerprint: str = ""  # this run's stage fingerprint
    # a resumable stage's kept partial folder: the fingerprint of the run that started it
    # (None for a fresh folder); the stage decides what it can continue from.
    interrupted_fingerprint: str | None = None


@dataclass(frozen=True)
class StageResult:
    name: str
    path: Path
    fingerprint: str
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


BuildFn = Callable[[StageContext], dict[str, Any]]
StageImpl = UnitStage | BuildFn


def stage_dir(workdir: str | Path, name: str) -> Path:
    """The published output directory of a stage, e.g. generate -> <workdir>/negatives."""
    return Path(workdir) / get_stage(name).dir


def read_stage_record(workdir: str | Path, name: str) -> dict[str, Any] | None:
    p = stage_dir(workdir, name) / "stage.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def missing_input(name: str, up: str, workdir: str | Path) -> StageInputError:
    return StageInputError(
        f"stage '{name}' needs the outputs of '{up}', which are missing in {workdir}: "
        f"run {up} first (regdpo run CONFIG --stage {up}, or the whole pipeline)"
    )


def model_identity(cfg: Config) -> str:
    """The base model as units and fingerprints see it: its settings (device excluded) and, for
    a model directory, its files (configs + weight names/sizes/mtimes), read without torch."""
    files = ""
    if cfg.model.path is not None:
        root = Path(cfg.model.path)
        files = dir_fingerprint(root) if root.is_dir() else "missing"
    return short_hash({"model": fingerprint_payload(cfg.model), "files": files})


def _shard_files(cfg: Config) -> str:
    """Size and mtime of every shard index.json lists: a shard edited or replaced after encode
    makes what trained or evaluated on it stale (read without torch)."""
    root = Path(cfg.workdir) / "shards"
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        return "missing"
    stats = []
    for split in sorted(index.get("splits", {})):
        for shard in index["splits"][split].get("shards", []):
            try:
                st = (root / shard["path"]).stat()
                stats.append([shard["path"], st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([shard["path"], None, None])
    return short_hash(stats)


def _upstream(cfg: Config, name: str) -> dict[str, str]:
    upstream: dict[str, str] = {}
    for up in get_stage(name).inputs:
        rec = read_stage_record(cfg.workdir, up)
        if rec is None:
            raise missing_input(name, up, cfg.workdir)
        upstream[up] = rec["fingerprint"]
    return upstream


def input_identities(cfg: Config, name: str) -> dict[str, str]:
    """What a whole stage's fingerprint covers besides its settings and its input stages'
    fingerprints: the model's files and the shard files as they are now (stage.json keeps them,
    so `regdpo status` can say which changed)."""
    stage = get_stage(name)
    return {"model": model_identity(cfg) if stage.reads_model else "",
            "shards": _shard_files(cfg) if "encode" in stage.inputs else ""}


def expected_fingerprint(cfg: Config, name: str) -> tuple[str, dict[str, str]]:
    """A whole stage's fingerprint now: its config sections, its inputs' fingerprints, the model."""
    stage = get_stage(name)
    upstream = _upstream(cfg, name)
    payload = {"stage": name, "config": cfg.section_fingerprint(*stage.sections), "seed": cfg.seed,
               "upstream": upstream, **input_identities(cfg, name)}
    return short_hash(payload), upstream


def get_impl(name: str) -> StageImpl:
    """A unit stage's `UNITS` or a whole stage's `build`, importing its module now."""
    import regdpo.stages as stages  # tests replace stages.get_impl

    return stages.get_impl(name)


def plan_stage(cfg: Config, name: str, *, force: bool = False, impl: UnitStage | None = None) -> StagePlan:
    """What a unit stage would do now: reused, staged and pending units, in work items."""
    stage = get_stage(name)
    if not stage.units:
        raise ValueError(f"{name} is a whole stage: it has no units to plan")
    _upstream(cfg, name)  # its inputs must be published
    rec = read_stage_record(cfg.workdir, name)
    return make_plan(impl or get_impl(name), cfg, Path(cfg.workdir), force=force,
                     published_fingerprint=rec["fingerprint"] if rec else None)


def publish_stage(cfg: Config, plan: StagePlan, *, impl: UnitStage | None = None, seconds: float = 0.0
                  ) -> StageResult:
    """Publish a unit stage's done units (call with the workdir lock held, after its work items)."""
    impl = impl or get_impl(plan.stage)
    workdir = Path(cfg.workdir)
    fingerprint, summary = publish_plan(impl, cfg, workdir, plan,
                                        {"upstream": _upstream(cfg, plan.stage), "seconds": round(seconds, 3)})
    return StageResult(plan.stage, stage_dir(workdir, plan.stage), fingerprint, False, summary, seconds)


def is_current(cfg: Config, name: str, impl: UnitStage | None = None) -> bool:
    return stage_state(cfg, name, impl)[0] == "current"


def stage_state(cfg: Config, name: str, impl: UnitStage | None = None) -> tuple[str, str]:
    """(current | stale | missing, why) for one stage, from what is on disk (no lock, no writes)."""
    stage = get_stage(name)
    rec = read_stage_record(cfg.workdir, name)
    if name in pending_journals(cfg.workdir):
        return "stale", "a publish was interrupted; the next run completes it"
    if rec is None:
        partial = Path(cfg.workdir) / f".{stage.dir}.partial"
        if stage.resumable and partial.is_dir():
            return "missing", "interrupted run present (resumes)"
        staged = Staging(Path(cfg.workdir), name).root
        if stage.units and staged.is_dir() and any(staged.iterdir()):
            failed = _failed_text(cfg, name)
            return "missing", failed or "interrupted run present (finished units are kept)"
        return "missing", ""
    try:
        if stage.units:
            plan = plan_stage(cfg, name, impl=impl)
            if plan.skipped:
                return "current", ""
            n_new = len(plan.pending) + len(plan.staged)
            dropped = plan.published_fingerprint != plan.fingerprint and not n_new
            why = (f"{n_new} of {len(plan.units)} units to do" if n_new
                   else "units to drop from the published tables" if dropped else "to publish")
            failed = _failed_text(cfg, name, {u.key for u in plan.pending})
            return "stale", f"{why}; {failed}" if failed else why
        fingerprint, _ = expected_fingerprint(cfg, name)
    except StageInputError:
        return "stale", "its inputs are missing"
    except (ValueError, OSError) as err:
        return "stale", f"cannot plan: {err}"
    if rec["fingerprint"] != fingerprint:
        return "stale", "settings or inputs changed since it ran"
    return "current", ""


def _failed_text(cfg: Config, name: str, keys: set[str] | None = None) -> str:
    """`N failed in the last run: <counted reasons>` from the unit failure notes in staging
    (those of `keys` only, when given); "" when there are none."""
    notes = [f for k, f in Staging(Path(cfg.workdir), name).failures().items() if keys is None or k in keys]
    if not notes:
        return ""
    return f"{len(notes)} failed in the last run: {reasons_text(reason_counts(notes))}"


def run_stage(cfg: Config, name: str, impl: StageImpl | None = None, *, force: bool = False,
              pool: Any = None, command: str | None = None) -> StageResult:
    """Run one stage unless it is current; holds the workdir lock for the duration (`command`
    is what the lock names as its holder).

    A unit stage runs its pending work items on `pool`, anything with `map(work_items)` that
    returns when every item is done (a parallel.DevicePool over the stage's configured devices
    by default; an orchestrator passes one that spreads items over its workers), then publishes.
    A whole stage calls `impl(ctx)`.
    """
    get_stage(name)  # an unknown name fails before the lock
    workdir = Path(cfg.workdir)
    with workdir_lock(workdir, command=command or f"regdpo stage {name}"):
        recover(workdir, [s.dir for s in STAGE.values()])
        impl = impl or get_impl(name)
        if isinstance(impl, UnitStage):
            return _run_units(cfg, name, impl, force, pool)
        return _run_whole(cfg, name, impl, force)


def _run_units(cfg: Config, name: str, impl: UnitStage, force: bool, pool: Any) -> StageResult:
    workdir = Path(cfg.workdir)
    staging = Staging(workdir, name)
    staging.clean_temporaries()
    start = time.perf_counter()
    plan = plan_stage(cfg, name, force=force, impl=impl)
    if force and staging.redo_fingerprint() != plan.fingerprint:
        # a redo redoes every unit, not only the ones never finished; the same redo interrupted
        # and run again (what `regdpo run` prints after Ctrl-C) keeps what it finished
        staging.begin_redo(plan.fingerprint)
        plan = plan_stage(cfg, name, force=force, impl=impl)
    if plan.skipped:
        rec = read_stage_record(workdir, name) or {}
        return StageResult(name, stage_dir(workdir, name), plan.fingerprint, True, rec.get("summary", {}))
    todo = sum(len(item.units) for item in plan.work_items)
    num_units = len({u.key for u in plan.units})
    log.info("%s: %d units: %d reused, %d finished earlier, %d to do in %d work items", name, num_units,
             len(plan.reused), len(plan.staged), todo, len(plan.work_items))
    if plan.work_items:
        progress = Progress(name, num_units, len(plan.reused) + len(plan.staged), plan.work_items, staging)
        if pool is not None:
            pool.map(plan.work_items, progress=progress)
        else:
            from regdpo.stages.parallel import DevicePool

            with DevicePool(cfg, name, workdir, impl=impl) as own:
                own.map(plan.work_items, progress=progress)
    result = publish_stage(cfg, plan, impl=impl, seconds=time.perf_counter() - start)
    staging.end_redo()
    failed = result.summary.get("units_failed", 0)
    if failed:
        log.warning("%s: %s; published the other %d", name,
                    failures_line(failed, num_units, result.summary.get("failure_reasons", {})), num_units - failed)
    return result


def _run_whole(cfg: Config, name: str, build: BuildFn, force: bool) -> StageResult:
    stage = get_stage(name)
    workdir = Path(cfg.workdir)
    fingerprint, upstream = expected_fingerprint(cfg, name)
    final = stage_dir(workdir, name)
    rec = read_stage_record(workdir, name)
    if not force and rec is not None and rec["fingerprint"] == fingerprint:
        return StageResult(name, final, fingerprint, True, rec.get("summary", {}))

    partial = workdir / f".{final.name}.partial"
    marker = partial / "partial.json"
    # A resumable stage (train) gets an interrupted run's partial folder back whatever its
    # settings were: the stage knows what it can continue from (regdpo/train checks its own
    # checkpoints' lineage) and clears the rest. Other stages always start from an empty folder.
    if partial.exists() and not stage.resumable:
        shutil.rmtree(partial)
    interrupted = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}))

    start = time.perf_counter()
    previous = final if rec is not None else None
    summary = build(StageContext(cfg, workdir, partial, force=force, previous=previous, fingerprint=fingerprint,
                                 interrupted_fingerprint=interrupted))
    seconds = time.perf_counter() - start

    save_resolved(cfg, partial)
    record = {
        "stage": name,
        "fingerprint": fingerprint,
        "upstream": upstream,
        "inputs": input_identities(cfg, name),
        "summary": summary,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (partial / "stage.json").write_text(json.dumps(record, indent=2))
    # partial.json stays until the swap: a kill before the journal is written leaves a finished,
    # resumable partial (a resumed train run finds its last checkpoint at max_steps and finishes).
    txn = Transaction(workdir, name)
    txn.swap(partial, final)
    txn.delete(final / "partial.json")
    txn.commit()
    return StageResult(name, final, fingerprint, False, summary, seconds)
