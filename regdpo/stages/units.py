"""Per-clip units of work: plan them, do the pending ones anywhere, publish what is done.

A unit stage (ingest, generate, encode) turns its input into units - one manifest row's
clip(s), one clip's negative(s), one pair - each with a content key: the unit's identity plus
every setting that shapes it, the base-model fingerprint and the seed. Then:

1. `plan`: every wanted unit; those whose key is in the stage's published index
   (`<stage dir>/units.parquet`) are reused, those finished in staging await publication,
   the rest are pending and split into work items (JSON-able batches of units).
2. `run_work_item` (any process or machine that sees the workdir): a worker writes each unit
   into `<workdir>/.staging/<stage>/<key>.tmp-*/` and renames it to `<key>/` when whole, so a
   kill costs at most the units in flight and nothing half-written looks finished.
3. `publish`: the stage assembles its tables from the reused and staged results, moves staged
   files into the public layout and deletes files of units no longer wanted, all in one
   journaled transaction (journal.py). The stage fingerprint is the hash of the published keys.

Failed units (an exception in one clip) are recorded with their reason, left out of the
published tables, counted in stage.json, and retried by the next run. A stage publishes only
while its failed units are at most `<stage>.max_failed_fraction` of its units and not all of
them; past that it fails with one line that counts the reasons (`UnitsFailed`), publishes
nothing, and keeps every finished unit for the next run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from regdpo.config import Config
from regdpo.durable import TMP_MARK, atomic_write_json, tmp_name
from regdpo.errors import is_transient
from regdpo.stages.accounting import check_failures, first_line, reason_counts
from regdpo.hashing import short_hash
from regdpo.progress import ProgressLog
from regdpo.stages.journal import Transaction
from regdpo.stages.published_files import changed_units, record_files
from regdpo.stages.registry import get_stage

log = logging.getLogger(__name__)

STAGING = ".staging"
INDEX_NAME = "units.parquet"
REDO_NAME = "redo.json"  # in a staging folder: the forced redo its units belong to


def content_key(*parts: Any) -> str:
    """The key of a unit: a short hash of its parts."""
    return short_hash(parts)


@dataclass(frozen=True)
class Unit:
    id: str  # stable name within the stage: a manifest row's source+window, a clip_id, a pair id
    key: str  # content key (see module docstring)
    spec: dict[str, Any]  # JSON-able: everything processing needs, so any machine can do it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkItem:
    """A batch of pending units: the unit of scheduling (a Prefect task, a device process)."""

    stage: str
    index: int
    units: list[Unit]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "index": self.index, "units": [u.to_dict() for u in self.units]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkItem":
        return cls(d["stage"], int(d["index"]), [Unit(**u) for u in d["units"]])


@dataclass
class StagePlan:
    stage: str
    units: list[Unit]  # every wanted unit, in order
    reused: set[str]  # keys already published
    staged: set[str]  # keys finished in staging, not yet published
    pending: list[Unit]
    work_items: list[WorkItem]
    fingerprint: str  # what the stage fingerprint will be when every unit is published
    published_fingerprint: str | None  # what stage.json says now (None: never published)
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific (ingest: plan-time rejects)

    @property
    def skipped(self) -> bool:
        """Nothing to do and nothing to publish: the published output is current."""
        return not self.pending and not self.staged and self.published_fingerprint == self.fingerprint

    @property
    def counts(self) -> dict[str, int]:
        return {"units": len(self.units), "reused": len(self.reused), "staged": len(self.staged),
                "pending": len(self.pending), "work_items": len(self.work_items)}


class Staging:
    """`<workdir>/.staging/<stage>/`: finished units awaiting publication, and failure notes."""

    def __init__(self, workdir: Path, stage: str):
        self.root = Path(workdir) / STAGING / stage

    def unit_dir(self, key: str) -> Path:
        return self.root / key

    def is_done(self, key: str) -> bool:
        return (self.root / key / "unit.json").is_file()

    def begin(self, key: str) -> Path:
        """A fresh private folder to write one unit's files into."""
        tmp = tmp_name(self.root / key)
        tmp.mkdir(parents=True)
        return tmp

    def finish(self, tmp: Path, unit: Unit, result: dict[str, Any]) -> None:
        """Seal a unit: unit.json, then one rename. A unit another process finished first wins."""
        record = {"id": unit.id, "key": unit.key, **result}
        (tmp / "unit.json").write_text(json.dumps(record))
        final = self.root / unit.key
        try:
            tmp.rename(final)
        except OSError:
            if not self.is_done(unit.key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        (self.root / f"{unit.key}.failed.json").unlink(missing_ok=True)

    def fail(self, unit: Unit, reason: str, *, transient: bool = False, details: str = "") -> None:
        """Record why a unit failed (`details`: e.g. the traceback, kept here and not in the log)."""
        atomic_write_json(self.root / f"{unit.key}.failed.json", {"id": unit.id, "key": unit.key, "reason": reason,
                                                                   "transient": transient, "details": details})

    def failure(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / f"{key}.failed.json").read_text())
        except (OSError, ValueError):
            return None

    def read(self, key: str) -> dict[str, Any]:
        return json.loads((self.root / key / "unit.json").read_text())

    def failures(self) -> dict[str, dict[str, Any]]:
        if not self.root.is_dir():
            return {}
        return {p.name.split(".")[0]: json.loads(p.read_text()) for p in self.root.glob("*.failed.json")}

    def clean_temporaries(self) -> None:
        """Drop folders of units that were in flight when a process died."""
        if self.root.is_dir():
            for p in self.root.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # A forced redo starts from an empty staging area and marks it with its plan's fingerprint:
    # the same redo, interrupted and run again, keeps the units it finished.
    def redo_fingerprint(self) -> str | None:
        try:
            return json.loads((self.root / REDO_NAME).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def begin_redo(self, fingerprint: str) -> None:
        self.clear()
        atomic_write_json(self.root / REDO_NAME, {"fingerprint": fingerprint})

    def end_redo(self) -> None:
        (self.root / REDO_NAME).unlink(missing_ok=True)


class UnitWorker(ABC):
    """Holds what processing needs on one device (a model, a VAE...) across work items."""

    @abstractmethod
    def process(self, unit: Unit, out: Path) -> dict[str, Any]:
        """Do one unit, writing its files into `out`; return its result (JSON-able: table rows,
        `files`: {public path relative to the stage folder: file name in `out`}). Raise to fail it."""

    def process_batch(self, units: list[Unit], staging: Staging, progress: ProgressLog | None = None
                      ) -> dict[str, int]:
        """Every unit of a work item; the default does them one at a time. `progress` counts
        each unit done or failed."""
        counts = {"done": 0, "failed": 0}
        for unit in units:
            counts["done" if run_one(self, unit, staging) else "failed"] += 1
            if progress is not None:
                progress.update(1)
        return counts

    def close(self) -> None:
        pass


class UnusableResult(ValueError):
    """A unit was processed but its result is unusable (a non-finite generation); the message
    is the reason recorded for it."""


class BatchedUnitWorker(UnitWorker):
    """A worker that does several units per call (one denoiser or VAE call for `batch_size`
    units). A batch that raises is redone one unit at a time, so only the bad unit fails; a
    unit whose result carries an "error" fails alone."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Units per `process_units` call."""

    @abstractmethod
    def process_units(self, units: list[Unit], outs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Do `units` together, each writing into its `outs[unit.key]`; results by unit key
        (a result with "error": reason fails that unit)."""

    def process(self, unit: Unit, out: Path) -> dict[str, Any]:
        result = self.process_units([unit], {unit.key: out})[unit.key]
        if "error" in result:
            raise UnusableResult(result["error"])
        return result

    def process_batch(self, units: list[Unit], staging: Staging, progress: ProgressLog | None = None
                      ) -> dict[str, int]:
        counts = {"done": 0, "failed": 0}
        todo = [u for u in units if not staging.is_done(u.key)]
        counts["done"] += len(units) - len(todo)
        if progress is not None and counts["done"]:
            progress.update(counts["done"])
        size = max(1, self.batch_size)
        for i in range(0, len(todo), size):
            batch = todo[i:i + size]
            outs = {u.key: staging.begin(u.key) for u in batch}
            try:
                results = self.process_units(batch, outs)
            except Exception as err:  # noqa: BLE001 - one bad unit must not fail its neighbours
                log.warning("%s: a batch of %d units failed (%s); redoing them one at a time", staging.root.name,
                            len(batch), err)
                for u in batch:
                    shutil.rmtree(outs[u.key], ignore_errors=True)
                    counts["done" if run_one(self, u, staging) else "failed"] += 1
                if progress is not None:
                    progress.update(len(batch))
                continue
            for u in batch:
                result = results[u.key]
                if "error" in result:
                    shutil.rmtree(outs[u.key], ignore_errors=True)
                    log.warning("%s: unit %s failed: %s", staging.root.name, u.id, result["error"])
                    staging.fail(u, result["error"])
                    counts["failed"] += 1
                else:
                    staging.finish(outs[u.key], u, result)
                    counts["done"] += 1
            if progress is not None:
                progress.update(len(batch))
        return counts


def run_one(worker: UnitWorker, unit: Unit, staging: Staging) -> bool:
    """Process and seal one unit; a failure is recorded with its reason (and retried next run)."""
    if staging.is_done(unit.key):
        return True
    out = staging.begin(unit.key)
    start = time.perf_counter()
    try:
        result = worker.process(unit, out)
    except Exception as err:  # one clip must not stop the batch: its reason is published
        shutil.rmtree(out, ignore_errors=True)
        reason = str(err) if isinstance(err, UnusableResult) else f"{type(err).__name__}: {err}"
        # one line per unit; the traceback goes into the unit's failure note (.staging/<stage>/<key>.failed.json)
        log.warning("%s: unit %s failed: %s", staging.root.name, unit.id, first_line(reason))
        staging.fail(unit, reason, transient=is_transient(err), details=traceback.format_exc(limit=-8))
        return False
    result.setdefault("seconds", round(time.perf_counter() - start, 3))
    staging.finish(out, unit, result)
    return True


class UnitStage(ABC):
    """What a unit stage provides; the machinery around it is in this module."""

    name: str

    @abstractmethod
    def plan_units(self, cfg: Config, workdir: Path) -> tuple[list[Unit], dict[str, Any]]:
        """Every wanted unit in order, plus stage-specific plan data."""

    @abstractmethod
    def open_worker(self, cfg: Config, workdir: Path, device: str | None) -> UnitWorker:
        """A worker for `device` (None: the configured default)."""

    @abstractmethod
    def assemble(self, cfg: Config, workdir: Path, plan: StagePlan, results: dict[str, dict[str, Any]],
                 new_keys: set[str], old: dict[str, dict[str, Any]], txn: Transaction) -> tuple[set[str], dict[str, Any]]:
        """Write the stage's tables and move/delete its public files through `txn`.

        `results` maps the key of every wanted unit that is done (reused or staged) to its result;
        `new_keys` are the staged ones (their files are in Staging.unit_dir(key)); `old` is the
        published index (key -> result). Returns the keys now published and the stage's summary.
        """

    def work_item_size(self, cfg: Config) -> int:
        return 16

    def public_files(self, result: dict[str, Any]) -> list[str]:
        """The published files a unit's result lives in, relative to the stage folder."""
        return list(result.get("files", {}))

    def devices(self, cfg: Config) -> list[str | None]:
        return [None]

    def max_failed_fraction(self, cfg: Config) -> float:
        """The share of units that may fail with the stage still publishing (accounting.py)."""
        return getattr(cfg, self.name).max_failed_fraction


# ---- the published index ------------------------------------------------------------------


def stage_folder(workdir: Path, name: str) -> Path:
    return Path(workdir) / get_stage(name).dir


def read_index(workdir: Path, name: str) -> dict[str, dict[str, Any]]:
    """key -> result of every published unit of a stage (empty if never published)."""
    path = stage_folder(workdir, name) / INDEX_NAME
    if not path.is_file():
        return {}
    df = pd.read_parquet(path)
    return {k: json.loads(r) for k, r in zip(df["key"], df["result"])}


def _index_bytes(results: dict[str, dict[str, Any]]) -> bytes:
    import io

    df = pd.DataFrame({"key": list(results), "id": [r.get("id", "") for r in results.values()],
                       "result": [json.dumps(r) for r in results.values()]})
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def keys_fingerprint(name: str, keys: set[str] | list[str]) -> str:
    return content_key(name, sorted(keys))


# ---- plan / work items / publish -------------------------------------------------------------


def make_plan(impl: UnitStage, cfg: Config, workdir: Path, *, force: bool = False,
              published_fingerprint: str | None = None) -> StagePlan:
    units, extra = impl.plan_units(cfg, workdir)
    seen: set[str] = set()
    unique = []
    for u in units:  # two manifest rows with the same content are one unit
        if u.key not in seen:
            seen.add(u.key)
            unique.append(u)
    staging = Staging(workdir, impl.name)
    index = {} if force else read_index(workdir, impl.name)
    changed = changed_units(stage_folder(workdir, impl.name), impl.name,
                            {u.key: impl.public_files(index[u.key]) for u in unique if u.key in index})
    reused = {u.key for u in unique if u.key in index and u.key not in changed}
    staged = {u.key for u in unique if u.key not in reused and staging.is_done(u.key)}
    pending = [u for u in unique if u.key not in reused and u.key not in staged]
    size = max(1, impl.work_item_size(cfg))
    items = [WorkItem(impl.name, i, pending[s:s + size]) for i, s in enumerate(range(0, len(pending), size))]
    return StagePlan(impl.name, units, reused, staged, pending, items, keys_fingerprint(impl.name, seen),
                     published_fingerprint, force, extra)


def process_item(worker: UnitWorker, item: WorkItem, workdir: Path) -> dict[str, int]:
    staging = Staging(workdir, item.stage)
    start = time.perf_counter()
    progress = ProgressLog(log, f"{item.stage}: work item {item.index}", len(item.units))
    counts = worker.process_batch(item.units, staging, progress)
    seconds = time.perf_counter() - start
    log.info("%s: work item %d done: %d units (%d failed) in %.1f s", item.stage, item.index,
             len(item.units), counts.get("failed", 0), seconds)
    return {**counts, "seconds": round(seconds, 3)}


def publish_plan(impl: UnitStage, cfg: Config, workdir: Path, plan: StagePlan, record_extra: dict[str, Any]
                 ) -> tuple[str, dict[str, Any]]:
    """Publish every done unit of `plan` in one transaction; returns (fingerprint, summary)."""
    from regdpo.config import save_resolved

    staging = Staging(workdir, impl.name)
    old = read_index(workdir, impl.name)
    results: dict[str, dict[str, Any]] = {}
    new_keys: set[str] = set()
    wanted_keys = {u.key for u in plan.units}
    for u in plan.units:
        if u.key in results:
            continue
        if u.key in plan.reused:
            results[u.key] = old[u.key]
        elif staging.is_done(u.key):
            results[u.key] = staging.read(u.key)
            new_keys.add(u.key)
    failures = {k: f for k, f in staging.failures().items() if k in wanted_keys and k not in results}
    check_failures(impl.name, len(wanted_keys), list(failures.values()), impl.max_failed_fraction(cfg),
                   where=f"{staging.root}/*.failed.json")

    folder = stage_folder(workdir, impl.name)
    txn = Transaction(workdir, impl.name)
    try:
        kept, summary = impl.assemble(cfg, workdir, plan, results, new_keys, old, txn)
        fingerprint = keys_fingerprint(impl.name, kept)
        summary = {**summary, "units_done": len(new_keys & kept), "units_reused": len(plan.reused & kept),
                   "units_failed": len(failures)}
        if failures:
            summary["failure_reasons"] = reason_counts(list(failures.values()))
            summary["failed"] = [{"id": f["id"], "reason": first_line(f["reason"])} for f in list(failures.values())[:20]]
        txn.write_bytes(folder / INDEX_NAME, _index_bytes({k: results[k] for k in sorted(kept)}))
        record = {"stage": impl.name, "fingerprint": fingerprint, "planned_fingerprint": plan.fingerprint,
                  **record_extra, "summary": summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        txn.write_json(folder / "stage.json", record)
        cfg_tmp = txn.new_path(folder / "config.yaml")
        save_resolved(cfg, cfg_tmp.parent, cfg_tmp.name)
        for key in new_keys:
            txn.delete(staging.unit_dir(key))  # after its files have been moved out
        for key, f in staging.failures().items():
            if key not in wanted_keys or key in results:
                txn.delete(staging.root / f"{key}.failed.json")
    except BaseException:
        txn.abort()
        raise
    txn.commit()
    record_files(folder, [rel for k in kept for rel in impl.public_files(results[k])])
    return fingerprint, summary
