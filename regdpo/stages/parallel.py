"""Run a unit stage's work items on every local device: one process per device.

    with DevicePool(cfg, "generate", workdir) as pool:   # devices from generate.devices
        pool.map(plan.work_items)                         # or pool.run(item) from many threads

With one device the work runs in this process (the model is loaded once, on first use). With
several, each device gets its own spawned process that loads the model once and takes work
items from its inbox; `run` is blocking and thread-safe, so an orchestrator can call it from
one thread per device (Prefect's thread pool) and every device stays busy. A device process
that dies (out of memory, kill -9) fails only the item it held; the next item starts a new one.
A device process dies with the process that started it (kill -9 included).

`stop()` ends the pool's work now (an interrupt, a cancelled run): device processes are killed,
an item running in this process gets `PoolStopped` raised in its thread, items waiting for a
device and any later `run` raise `PoolStopped`. Finished units stay in staging.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from regdpo.config import Config
from regdpo.errors import is_transient
from regdpo.procs import die_with_parent, raise_in_thread
from regdpo.stages.units import UnitStage, UnitWorker, WorkItem, process_item

log = logging.getLogger(__name__)


class WorkItemError(RuntimeError):
    """A work item failed as a whole (its device process died, or the worker could not start).

    `transient` as the device process classified the error (regdpo/errors.py); a process that
    died (the kernel's OOM killer, a lost GPU) may well live on a retry."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


class PoolStopped(BaseException):
    """The pool was stopped (`DevicePool.stop`): the item did not finish, nothing is wrong with it.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` records it as the
    unit's failure."""


CLOSE_WAIT_S = 30.0  # for an item stopped in this process to unwind before its worker is closed
PARENT_CHECK_S = 5.0  # an idle device process checks this often that its parent still lives


def unit_stage(name: str) -> UnitStage:
    from regdpo.stages.runner import get_impl

    impl = get_impl(name)
    if not isinstance(impl, UnitStage):
        raise ValueError(f"stage {name!r} does not work in units")
    return impl


def _intra_op_threads() -> int | None:
    """This process's torch intra-op thread count, if torch is in use here."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _device_main(cfg: Config, impl: UnitStage, workdir: str, device: str | None, inbox, outbox,
                 parent: int, num_threads: int | None = None) -> None:
    """A device process: open the worker once, then do work items until told to stop.

    It computes with the caller's intra-op thread count: CPU kernels (the VAE decode) round
    differently with another, so the bytes would depend on whether an item ran here or in the
    caller (the reproducibility contract in regdpo/stages/generate.py)."""
    die_with_parent(parent)  # no device process outlives the run that started it
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    stage = impl.name
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage}[{device}] %(message)s")
    try:
        worker = impl.open_worker(cfg, Path(workdir), device)
    except BaseException as err:
        outbox.put(("error", {"message": f"could not start the {stage} worker on {device}: {type(err).__name__}: {err}",
                              "transient": is_transient(err)}, traceback.format_exc()))
        return
    outbox.put(("ready", None, None))
    try:
        while True:
            try:
                msg = inbox.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                if os.getppid() != parent:  # orphaned: nobody will read our results
                    return
                continue
            if msg is None:
                return
            try:
                outbox.put(("ok", process_item(worker, WorkItem.from_dict(msg), Path(workdir)), None))
            except BaseException as err:
                outbox.put(("error", {"message": f"{type(err).__name__}: {err}", "transient": is_transient(err)},
                            traceback.format_exc()))
    finally:
        worker.close()


class _Proc:
    """One device process with its inbox and outbox."""

    def __init__(self, ctx, cfg: Config, impl: UnitStage, workdir: Path, device: str | None):
        self.device = device
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_device_main, name=f"regdpo-{impl.name}-{device}", daemon=True,
                                args=(cfg, impl, str(workdir), device, self.inbox, self.outbox, os.getpid(),
                                      _intra_op_threads()))
        self.proc.start()
        self._wait("ready")

    def _wait(self, expect: str) -> Any:
        while True:
            try:
                kind, payload, tb = self.outbox.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise WorkItemError(f"device process {self.device} died (exit code {self.proc.exitcode})",
                                        transient=True) from None
                continue
            if kind == "error":
                raise WorkItemError(f"{payload['message']} [device {self.device}]\n{tb}", transient=payload["transient"])
            assert kind == expect, (kind, expect)
            return payload

    def run(self, item: WorkItem) -> dict[str, Any]:
        self.inbox.put(item.to_dict())
        return self._wait("ok")

    def stop(self, now: bool = False) -> None:
        if self.proc.is_alive() and not now:
            self.inbox.put(None)
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=30)


class DevicePool:
    """Work items over local devices (see module docstring)."""

    def __init__(self, cfg: Config, stage: str, workdir: str | Path | None = None,
                 devices: list[str | None] | None = None, impl: UnitStage | None = None):
        self.cfg, self.stage = cfg, stage
        self.workdir = Path(workdir or cfg.workdir)
        self.impl = impl or unit_stage(stage)
        self.devices = list(devices) if devices else self.impl.devices(cfg)
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.devices)):
            self._free.put(i)
        self._procs: dict[int, _Proc] = {}
        self._local: UnitWorker | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._local_thread: int | None = None  # the thread running an item in this process
        self._stop_lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def __enter__(self) -> "DevicePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run_on(self, slot: int, item: WorkItem) -> dict[str, Any]:
        if len(self.devices) == 1:
            with self._stop_lock:
                if self.stopped:
                    raise PoolStopped(self.stage)
                self._local_thread = threading.get_ident()
            try:
                if self._local is None:
                    self._local = self.impl.open_worker(self.cfg, self.workdir, self.devices[0])
                return process_item(self._local, item, self.workdir)
            finally:
                # a plain store, no lock: an interrupt landing here must not leave a lock held
                self._local_thread = None
        proc = self._procs.get(slot)
        if proc is None or not proc.proc.is_alive():
            proc = self._procs[slot] = _Proc(mp.get_context("spawn"), self.cfg, self.impl, self.workdir,
                                             self.devices[slot])
        return proc.run(item)

    def run(self, item: WorkItem | dict) -> dict[str, Any]:
        """Do one work item on a free device (blocks until one is free and the item is done)."""
        if isinstance(item, dict):
            item = WorkItem.from_dict(item)
        while True:  # a timeout, so that a waiting item notices `stop`
            if self.stopped:
                raise PoolStopped(self.stage)
            try:
                slot = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        try:
            if self.stopped:
                raise PoolStopped(self.stage)
            if len(self.devices) == 1:
                with self._lock:
                    return self._run_on(slot, item)
            try:
                return self._run_on(slot, item)
            except WorkItemError:
                if self.stopped:  # its device process was killed by `stop`
                    raise PoolStopped(self.stage) from None
                raise
        finally:
            self._free.put(slot)

    def map(self, items: list[WorkItem], progress: Any = None) -> list[dict[str, Any]]:
        """Every item, all devices busy; the first failure is raised after the others finish.
        `progress` (accounting.Progress) is told of each finished item and its line logged."""
        if not items:
            return []
        if len(self.devices) == 1:  # in this thread, one item after the other
            results = []
            for item in items:
                try:
                    results.append(self.run(item))
                finally:
                    if progress is not None:
                        log.info("%s", progress.item_done(item))
            return results
        with ThreadPoolExecutor(len(self.devices), thread_name_prefix=f"regdpo-{self.stage}") as ex:
            futures = {ex.submit(self.run, item): item for item in items}
            for future in as_completed(futures):
                if progress is not None:
                    log.info("%s", progress.item_done(futures[future]))
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]
            return [f.result() for f in futures]

    def stop(self) -> None:
        """End the work now (see the module docstring); `close` still releases the rest."""
        with self._stop_lock:
            self._stopped.set()
            if self._local_thread is not None and self._local_thread != threading.get_ident():
                raise_in_thread(self._local_thread, PoolStopped)
        for proc in list(self._procs.values()):
            proc.stop(now=True)

    def close(self) -> None:
        for proc in self._procs.values():
            proc.stop(now=self.stopped)
        self._procs.clear()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._local_thread is not None and time.monotonic() < deadline:  # an interrupted item unwinding
            time.sleep(0.05)
        if self._local is not None and self._local_thread is None:
            self._local.close()
            self._local = None
