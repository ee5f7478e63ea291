"""Run one stage with fingerprints and atomic publication.

A stage writes into `<workdir>/.<dir>.partial/` and is renamed to `<workdir>/<dir>/` only
when complete, with `stage.json` (fingerprint, upstream fingerprints, summary) and the
resolved `config.yaml` beside its outputs. A stage is done when `stage.json` exists and its
fingerprint matches; a rerun with the same fingerprint is a no-op, a changed setting (its
config sections or any upstream fingerprint) redoes it, `force=True` redoes regardless.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from regdpo.config import Config, save_resolved
from regdpo.fingerprint import dir_fingerprint
from regdpo.stages.registry import STAGE, STAGES, get_stage

__all__ = ["STAGES", "BuildFn", "StageContext", "StageInputError", "StageResult", "expected_fingerprint",
           "is_current", "read_stage_record", "run_stage", "stage_dir"]


class StageInputError(RuntimeError):
    """A stage's inputs are missing or stale; the message says which stage to run first."""


@dataclass(frozen=True)
class StageContext:
    """What a stage's `build` gets: the config, the workdir, the fresh (or resumed) partial
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


def external_inputs(cfg: Config, name: str) -> str:
    """A hash of what a stage reads from outside the workdir.

    ingest: the manifest's bytes, so a nightly run over a manifest that gained rows redoes
    ingest and everything after it. Model stages: the model directory (configs + weight file
    names/sizes/mtimes), so replaced weights redo generation; the tiny preset is its config.
    """
    if name == "ingest":
        manifest = Path(cfg.ingest.manifest)
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else "missing"
    if STAGE[name].reads_model and cfg.model.path is not None:
        root = Path(cfg.model.path)
        return dir_fingerprint(root) if root.is_dir() else "missing"
    return ""


def expected_fingerprint(cfg: Config, name: str) -> tuple[str, dict[str, str]]:
    """The fingerprint this stage would have now, from its config sections and its inputs."""
    upstream: dict[str, str] = {}
    for up in get_stage(name).inputs:
        rec = read_stage_record(cfg.workdir, up)
        if rec is None:
            raise missing_input(name, up, cfg.workdir)
        upstream[up] = rec["fingerprint"]
    payload = json.dumps(
        {"stage": name, "config": cfg.section_fingerprint(*STAGE[name].sections), "seed": cfg.seed, "upstream": upstream,
         "inputs": external_inputs(cfg, name)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16], upstream


def is_current(cfg: Config, name: str) -> bool:
    rec = read_stage_record(cfg.workdir, name)
    if rec is None:
        return False
    try:
        fp, _ = expected_fingerprint(cfg, name)
    except StageInputError:
        return False
    return rec["fingerprint"] == fp


BuildFn = Callable[[StageContext], dict[str, Any]]


def run_stage(cfg: Config, name: str, build: BuildFn, *, force: bool = False) -> StageResult:
    """Run `build(ctx)` unless the stage is already current.

    `build` writes everything into `ctx.out` (a fresh partial directory, or the kept partial
    of an interrupted resumable run) and returns a small JSON-able summary (counts, not tensors).
    """
    stage = get_stage(name)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
    marker.unlink()
    record = {
        "stage": name,
        "fingerprint": fingerprint,
        "upstream": upstream,
        "summary": summary,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (partial / "stage.json").write_text(json.dumps(record, indent=2))
    _publish(partial, final)
    return StageResult(name, final, fingerprint, False, summary, seconds)


def _publish(partial: Path, final: Path) -> None:
    """Swap the finished partial directory into place; the old one is removed afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    partial.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
