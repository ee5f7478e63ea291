"""Helper processes that die with the process that started them, kill -9 included.

`regdpo run` starts Prefect's temporary server and `regdpo serve` starts a server and workers.
A normal exit (or Ctrl-C) stops them through atexit/finally, but kill -9 runs no cleanup: the
children would live on under PID 1 with their ports open. So a small watchdog process watches
its parent; once the parent is gone (its parent pid changes: the kernel reparents it), it
terminates the children, SIGTERM then SIGKILL. The watchdog imports nothing heavy (no prefect).

    guard = die_with_me(pids=[server_pid], groups=[worker_pgid], remove=[tmpdir])  # the watchdog Popen

Run directly (what `die_with_me` starts):
    python -m pipelines.lifetime --parent 1200 --pid 1234 --group 5678 --remove /tmp/x
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

POLL_S = 0.2
GRACE_S = 5.0


def die_with_me(pids: Iterable[int] = (), groups: Iterable[int] = (),
                remove: Iterable[str | os.PathLike] = ()) -> subprocess.Popen:
    """Start a watchdog that terminates `pids` and process groups `groups` when this process dies,
    then removes the folders `remove` (a temporary server's database)."""
    args = [sys.executable, "-m", "pipelines.lifetime", "--parent", str(os.getpid())]
    for pid in pids:
        args += ["--pid", str(pid)]
    for pgid in groups:
        args += ["--group", str(pgid)]
    for path in remove:
        args += ["--remove", str(path)]
    # Its own session: a Ctrl-C or a group signal aimed at the parent leaves the watchdog to
    # do its job. stdin closed so it never competes for the terminal.
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (pid reused): not ours to wait for
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pids: list[int], groups: list[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate(pids: list[int], groups: list[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM, wait up to `grace_s` for everything to exit, then SIGKILL what is left."""
    _signal(pids, groups, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(map(_alive, pids)) and not any(map(_group_alive, groups)):
            return
        time.sleep(0.1)
    _signal(pids, groups, signal.SIGKILL)


def _watch(parent: int, pids: list[int], groups: list[int], remove: list[str]) -> int:
    while True:
        if os.getppid() != parent:  # the parent died: we were reparented
            terminate(pids, groups)
            for path in remove:
                shutil.rmtree(path, ignore_errors=True)
            return 0
        if not remove and not any(map(_alive, pids)) and not any(map(_group_alive, groups)):
            return 0  # everything we guard has exited on its own, nothing left to clean up
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True, help="the process whose death ends the watch")
    parser.add_argument("--pid", type=int, action="append", default=[], help="a process to terminate")
    parser.add_argument("--group", type=int, action="append", default=[], help="a process group to terminate")
    parser.add_argument("--remove", action="append", default=[], help="a folder to remove after that")
    ns = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent's death ends the watch
    return _watch(ns.parent, ns.pid, ns.group, ns.remove)


if __name__ == "__main__":
    sys.exit(main())
