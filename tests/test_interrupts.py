"""Stopping work without losing it, with fake stages (no torch, no Prefect server):

- DevicePool.stop interrupts the item running in this process and refuses the queued ones;
- device processes die with the process that started them, kill -9 included;
- a forced redo (`regdpo run --stage generate`) interrupted and run again keeps what it finished;
- the resume line of an interrupted `regdpo run` names what is left to redo.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from regdpo.config import load_config
from regdpo.stages.parallel import DevicePool, PoolStopped
from regdpo.stages.runner import read_stage_record, run_stage
from regdpo.stages.units import Staging, WorkItem, stage_folder
from tests.fakes import FakeUnits
from tests.process_helpers import alive, wait_for

ROOT = Path(__file__).resolve().parents[1]


def _manifest(config_path: Path, n: int) -> None:
    (config_path.parent / "manifest.csv").write_text("path,caption\n" + "".join(f"v{i}.mp4,c{i}\n" for i in range(n)))


def test_stop_interrupts_the_item_running_here_and_refuses_the_queued_one(config_path):
    _manifest(config_path, 2)
    cfg = load_config(config_path)
    impl = FakeUnits("ingest", size=1, delay_s=3600)  # never ends by itself
    plan_items = [WorkItem("ingest", i, [u]) for i, u in enumerate(impl.plan_units(cfg, Path(cfg.workdir))[0])]
    pool = DevicePool(cfg, "ingest", impl=impl)
    ended: dict[int, BaseException | None] = {}

    def run(item):
        try:
            pool.run(item)
            ended[item.index] = None
        except BaseException as err:  # noqa: BLE001 - what the thread ended with is the point
            ended[item.index] = err

    threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in plan_items]
    threads[0].start()
    staging = Staging(Path(cfg.workdir), "ingest")
    wait_for(lambda: staging.root.is_dir() and any(staging.root.iterdir()), 60, "the first unit's start")
    threads[1].start()  # waits for the device
    pool.stop()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert {i: type(e) for i, e in ended.items()} == {0: PoolStopped, 1: PoolStopped}
    assert not list(staging.root.glob("*/unit.json"))  # nothing finished, nothing recorded as failed
    assert staging.failures() == {}
    with pytest.raises(PoolStopped):
        pool.run(plan_items[0])
    pool.close()


_PARENT = """
import sys, time
from regdpo.config import load_config
from regdpo.stages.parallel import DevicePool
from regdpo.stages.units import WorkItem
from tests.fakes import FakeUnits
cfg = load_config(sys.argv[1])
impl = FakeUnits("ingest", size=1, devices=["cpu:a", "cpu:b"], delay_s=3600)
units = impl.plan_units(cfg, cfg.workdir_path)[0]
pool = DevicePool(cfg, "ingest", impl=impl)
import threading
for i, u in enumerate(units):
    threading.Thread(target=pool.run, args=(WorkItem("ingest", i, [u]),), daemon=True).start()
time.sleep(3600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_device_processes_die_with_their_parent_kill_9_included(config_path):
    import psutil

    _manifest(config_path, 2)
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, str(config_path)], cwd=ROOT, start_new_session=True)
    try:
        staging = Staging(Path(load_config(config_path).workdir), "ingest")
        wait_for(lambda: staging.root.is_dir() and len(list(staging.root.iterdir())) == 2, 300,
                 "both device processes at work", proc)
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                    if "multiprocessing" in " ".join(p.cmdline())]
        devices = [pid for pid in children if "spawn_main" in " ".join(psutil.Process(pid).cmdline())]
        assert len(devices) == 2, children
        proc.kill()
        proc.wait()
        wait_for(lambda: not [pid for pid in devices if alive(pid)], 60, "the end of the device processes")
    finally:  # the whole group: the parent, and device processes that outlived it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class _Interrupting:
    """A task pool that does the first `n` work items, then is interrupted (a Ctrl-C)."""

    def __init__(self, cfg, impl, n: int):
        self.cfg, self.impl, self.n = cfg, impl, n

    def map(self, items, progress=None):
        with DevicePool(self.cfg, self.impl.name, impl=self.impl) as pool:
            for item in items[:self.n]:
                pool.run(item)
        raise KeyboardInterrupt


def test_a_forced_redo_interrupted_and_run_again_keeps_what_it_finished(config_path):
    _manifest(config_path, 4)
    cfg = load_config(config_path)
    impl = FakeUnits("ingest", size=1)
    run_stage(cfg, "ingest", impl)
    staging = Staging(Path(cfg.workdir), "ingest")

    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "ingest", impl, force=True, pool=_Interrupting(cfg, impl, 2))
    redone = {json.loads(p.read_text())["id"]: (p.parent / f"{json.loads(p.read_text())['id']}.txt").stat().st_mtime_ns
              for p in staging.root.glob("*/unit.json")}
    assert len(redone) == 2
    result = run_stage(cfg, "ingest", impl, force=True)  # the same command again
    assert result.summary["units_done"] == 4
    items = stage_folder(Path(cfg.workdir), "ingest") / "items"
    assert {i: (items / f"{i}.txt").stat().st_mtime_ns for i in redone} == redone  # kept, not redone again
    assert staging.redo_fingerprint() is None  # a finished redo is not resumed by the next one


def test_the_resume_line_names_what_is_left_to_redo(config_path, fake_builders):
    from regdpo import stages
    from regdpo.cli import _resume_command

    cfg = load_config(config_path)
    started = time.time()
    for name in ("ingest", "generate"):  # published by the run that was interrupted
        stages.run(cfg, name)
    assert read_stage_record(cfg.workdir, "generate") is not None

    def line(stage, force, sets=None):
        return _resume_command(Path("c.yaml"), cfg, stage, force, sets, started)

    assert line(None, False) == "regdpo run c.yaml"  # current stages are skipped anyway
    assert line(["generate", "encode"], False, ["a=1"]) == "regdpo run c.yaml --stage encode --set a=1"
    assert line(None, True) == "regdpo run c.yaml --stage encode --stage train --stage evaluate"
    assert _resume_command(Path("c.yaml"), cfg, None, True, None, time.time() + 5) == "regdpo run c.yaml --force"
    assert line(["train"], False) == "regdpo run c.yaml --stage train"
