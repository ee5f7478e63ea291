"""Processes and threads that must stop with what started them.

    die_with_parent()                 # first thing in a child process (or as a Popen preexec_fn)
    die_with_parent(parent=pid)       # ... and exit now if `pid` is no longer our parent
    raise_in_thread(ident, Stopped)   # interrupt a thread of this process at its next instruction
    running(pid)                      # whether a process runs (a zombie does not)

A child left running after its parent was killed (kill -9 of a stage, a dead worker) goes on
holding a device and writing into a folder nobody will publish; on Linux the kernel can send it
SIGKILL when its parent dies (PR_SET_PDEATHSIG). Elsewhere callers check `os.getppid()` themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies. With `parent`, exit at once if that
    process already died (before the setting took, the kernel could not tell us)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def raise_in_thread(ident: int, exc: type[BaseException]) -> None:
    """Raise `exc` in the thread `ident` of this process at its next Python instruction (a thread
    cannot be killed; one blocked in a C call sees it when the call returns)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited. A zombie has exited: its parent has not
    collected it yet, which may be never where the process was orphaned in a container whose
    init does not reap (a killed worker's flow-run process), yet `kill(pid, 0)` still finds it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1] != "Z"
    except OSError:  # no /proc (not Linux): existing is all we can tell
        return True
