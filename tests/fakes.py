"""Fake stages without torch, for the runner, CLI and flow tests.

`FakeUnits(name)` is a real unit stage (units.UnitStage) over text: ingest's units are the
lines of the manifest file (`path,caption` rows), every later unit stage has one unit per unit
of its first input. Each unit writes `<stage dir>/items/<id>.txt`; the stage publishes
`items.json`. `fake_build(name)` is a whole stage's build that writes `<name>.txt`.
Module-level and picklable, so spawned device processes can run them too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from regdpo.stages.registry import STAGE
from regdpo.stages.units import Staging, Unit, UnitStage, UnitWorker, content_key, read_index, stage_folder


class FakeWorker(UnitWorker):
    def __init__(self, name: str, fail_ids: tuple[str, ...], device: str | None, delay_s: float,
                 fail_with: BaseException | None = None):
        self.name, self.fail_ids, self.device, self.delay_s = name, fail_ids, device, delay_s
        self.fail_with = fail_with

    def process(self, unit: Unit, out: Path) -> dict[str, Any]:
        if unit.id in self.fail_ids or "*" in self.fail_ids:
            raise self.fail_with or RuntimeError(f"cannot do {unit.id}")
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:  # in steps, as real work returns to Python between operations
            time.sleep(0.05)
        (out / f"{unit.id}.txt").write_text(f"{self.name}:{unit.id}:{unit.key}")
        torch = sys.modules.get("torch")  # imported here only if the process computes with torch
        return {"item": unit.id, "pid": os.getpid(), "device": self.device,
                "threads": torch.get_num_threads() if torch is not None else None,
                "files": {f"items/{unit.id}.txt": f"{unit.id}.txt"}}


class FakeUnits(UnitStage):
    """`fail_ids`: unit ids whose processing raises (`"*"`: every unit), with `fail_with` if given."""

    def __init__(self, name: str, calls: list[str] | None = None, fail_ids: tuple[str, ...] = (),
                 size: int = 2, devices: list[str | None] | None = None, delay_s: float = 0.0,
                 fail_with: BaseException | None = None):
        self.name = name
        self.calls = calls if calls is not None else []
        self.fail_ids, self.size, self._devices, self.delay_s = fail_ids, size, devices or [None], delay_s
        self.fail_with = fail_with

    def work_item_size(self, cfg) -> int:
        return self.size

    def devices(self, cfg) -> list[str | None]:
        return self._devices

    def plan_units(self, cfg, workdir: Path) -> tuple[list[Unit], dict[str, Any]]:
        shaping = cfg.section_fingerprint(*STAGE[self.name].sections)
        if self.name == "ingest":
            manifest = Path(cfg.ingest.manifest)
            lines = manifest.read_text().splitlines()[1:] if manifest.is_file() else []
            ids = [line.split(",")[0].replace(".", "_") for line in lines if line.strip()]
        else:
            up = STAGE[self.name].inputs[0]
            ids = sorted(r["item"] for r in read_index(workdir, up).values())
        return [Unit(i, content_key(self.name, i, shaping), {}) for i in ids], {}

    def open_worker(self, cfg, workdir: Path, device: str | None) -> UnitWorker:
        return FakeWorker(self.name, self.fail_ids, device, self.delay_s, self.fail_with)

    def assemble(self, cfg, workdir, plan, results, new_keys, old, txn):
        folder = stage_folder(workdir, self.name)
        staging = Staging(workdir, self.name)
        kept = set(results)
        items = sorted(results[k]["item"] for k in kept)
        for key in new_keys:
            for public, name in results[key]["files"].items():
                txn.move(staging.unit_dir(key) / name, folder / public)
        wanted = {f"{i}.txt" for i in items}
        if (folder / "items").is_dir():
            for p in (folder / "items").iterdir():
                if p.name not in wanted:
                    txn.delete(p)
        txn.write_bytes(folder / "items.json", json.dumps(items).encode())
        if self.name == "evaluate":
            txn.write_bytes(folder / "report.md", b"# report\n")
            txn.write_bytes(folder / "report.html", b"<h1>report</h1>\n")
        self.calls.append(self.name)
        return kept, {"num_items": len(items)}


def fake_build(name: str, calls: list[str]):
    def build(ctx) -> dict:
        for up in STAGE[name].inputs:
            assert (Path(ctx.workdir) / STAGE[up].dir / "stage.json").is_file(), f"{name} ran before {up}"
        calls.append(name)
        (ctx.out / f"{name}.txt").write_text(name)
        if name == "evaluate":
            (ctx.out / "report.md").write_text("# report\n")
            (ctx.out / "report.html").write_text("<h1>report</h1>\n")
        return {"num_items": 3}

    return build


def fake_impl(name: str, calls: list[str]):
    return FakeUnits(name, calls) if STAGE[name].units else fake_build(name, calls)


def hold_after(sealed: int) -> str:
    """Python source that a child process runs first: once `sealed` units of a stage are sealed,
    the next unit it starts blocks (its temporary folder made) until the process is killed. A
    test's kill -9 then lands mid-unit at a known point, however busy the machine is."""
    return f"""
import time
from regdpo.stages import units as _units
_begin = _units.Staging.begin
def _held(self, key):
    out = _begin(self, key)
    if len(list(self.root.glob("*/unit.json"))) >= {sealed}:
        while True:
            time.sleep(1)
    return out
_units.Staging.begin = _held
"""


def wait_for_sealed(staging: Staging, count: int, proc, bound_s: float = 600.0) -> None:
    """Wait (polling, up to a generous bound) until `count` units of `staging` are sealed."""
    deadline = time.monotonic() + bound_s
    while len(list(staging.root.glob("*/unit.json"))) < count:
        assert proc.poll() is None, f"the child exited ({proc.returncode}) before {count} units were sealed"
        assert time.monotonic() < deadline, f"fewer than {count} units sealed within {bound_s:.0f} s"
        time.sleep(0.05)
