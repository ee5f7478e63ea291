"""One run per workdir: an advisory lock that names its holder.

`<workdir>/.regdpo.lock` is held with `fcntl.flock` for the whole run and carries the holder
(pid, host, since, command) as JSON. The kernel drops a flock when its process dies, kill -9
included, so a lock left by a dead run is recovered by simply taking it again; on NFS, Linux
maps flock to POSIX byte-range locks, which the server also releases when the client dies.

The lock is reentrant within a process (the CLI holds it and the stage flows it calls take it
again), and work items that run in other processes (device workers, other machines) never take
it: they only write into the staging area under unique names (see units.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".regdpo.lock"

_held: dict[str, tuple[int, int]] = {}  # realpath -> (fd, depth), for reentrancy in this process
_guard = threading.Lock()


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir; the message names it (pid, host, since, command)."""

    transient = False  # regdpo/errors.py: fail at once naming the holder, never wait by retrying


def _holder_text(info: dict) -> str:
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {when} ({info.get('command', '?')})"


def read_holder(workdir: str | os.PathLike) -> dict | None:
    """What the lock file says about its last holder (it may no longer be running)."""
    try:
        text = (Path(workdir) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


@contextmanager
def workdir_lock(workdir: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold the workdir for one run; raise WorkdirLocked at once if another process holds it."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(root)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return

    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(root)
        os.close(fd)
        who = _holder_text(holder) if holder else "another process"
        raise WorkdirLocked(
            f"workdir {root} is in use by {who}; wait for that run to finish or stop it, "
            "or use another workdir"
        ) from None
    previous = read_holder(root)
    if previous and previous.get("pid") != os.getpid():
        # We got the flock, so that holder is gone (its process died without releasing).
        log.warning("workdir %s: recovered the lock of a run that ended without releasing it: %s",
                    root, _holder_text(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    with _guard:
        _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth <= 1:
                del _held[key]
        if depth <= 1:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
