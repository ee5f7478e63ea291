"""Helpers for tests that start, signal and wait for real processes (no timing thresholds:
waits on conditions, with generous bounds)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from regdpo.procs import running as alive  # noqa: F401 - a zombie has exited


def terminal_sigint() -> None:
    """Popen preexec_fn: what a terminal gives its foreground job, Ctrl-C at its default (a test
    runner started in the background may have it ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, poll_s: float = 0.2) -> None:
    """Until `condition()`; fails naming `what` (with the end of `log`) after `timeout_s`, or at
    once if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: " + (log.read_text()[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s: " + (
            log.read_text()[-3000:] if log else "")
        time.sleep(poll_s)


def tree(pid: int) -> list[int]:
    """The pids of every descendant of `pid`."""
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def checkpoints(root: Path) -> list[str]:
    """The checkpoints of the interrupted training run in <root>/run, oldest first."""
    return sorted(p.name for p in (root / "run" / ".train.partial" / "checkpoints").glob("step-*[0-9]"))


def step(checkpoint: str) -> int:
    return int(checkpoint.split("-")[1])
