"""Slots of a global concurrency limit (`regdpo-gpu`) that a dead holder cannot keep.

Prefect's `concurrency()` holds a slot under a lease that the holder renews; a holder that dies
keeps the slot until the lease runs out (5 min), and a server that restarts with leases in
memory forgets them while the slot stays counted: the next run waits, silently, for good. Here:

- a holder on this machine registers its lease in a file that it keeps flocked while it holds
  the slot (`<registry>/<limit>/<lease id>.json`: run, pid, host, since). The kernel drops the
  flock when the holder dies, kill -9 included, so whoever waits for a slot finds the dead
  holders' files unlocked and releases their leases at once: reclaimed as the workdir lock is;
- leases last LEASE_S (Prefect's minimum) and are renewed at 3/4 of that, so the server frees
  the slot of a holder on another machine within about a minute of its death;
- a run that waits says so, naming the holders it can see (which run, since when), and gives
  up after REGDPO_SLOT_TIMEOUT_S seconds (default one hour) with one line.

`regdpo serve` keeps leases on disk (pipelines/serve.py), so a restarted server still knows them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from regdpo.procs import running

log = logging.getLogger(__name__)

LEASE_S = 60.0  # the shortest lease Prefect's server accepts
SLOT_TIMEOUT_ENV = "REGDPO_SLOT_TIMEOUT_S"
DEFAULT_SLOT_TIMEOUT_S = 3600.0
REMIND_S = 600.0  # a waiting run says again that it waits, every ten minutes


class SlotTimeout(RuntimeError):
    """No slot within the wait allowed; the message is one line naming the holders."""


def slot_timeout_s() -> float:
    raw = os.environ.get(SLOT_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_SLOT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{SLOT_TIMEOUT_ENV}={raw!r}: expected seconds, e.g. 3600") from None
    if value <= 0:
        raise ValueError(f"{SLOT_TIMEOUT_ENV}={raw!r}: must be positive")
    return value


def registry(limit: str, api_url: str) -> Path:
    """This machine's holders of `limit` on the server at `api_url` (one folder per server and limit)."""
    server = hashlib.sha256(api_url.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"regdpo-slots-{os.getuid()}" / server / limit
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slots_text(count: int) -> str:
    return "a slot" if count == 1 else f"{count} slots"


def _holder_text(info: dict) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"{info.get('run', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since})"


def _process_alive(info: dict) -> bool:
    """False only when the holder's process is known to be gone (on this host)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True
    return running(info["pid"])


def _dead_or_live(folder: Path) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """The registered holders: (file, info) of those whose process is gone, info of the live ones."""
    dead, live = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile
            continue
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # locked: by the holder, or by a child it forked that outlives it
                if _process_alive(info):
                    live.append(info)
                    continue
            dead.append((path, info))
        except ValueError:  # written by a holder that died mid-write: dead, nothing to release
            dead.append((path, {}))
        finally:
            os.close(fd)
    return dead, live


def reclaim(client, folder: Path, say=log.warning) -> list[dict]:
    """Release the leases of holders that died; returns the live holders."""
    dead, live = _dead_or_live(folder)
    for path, info in dead:
        if info.get("lease_id"):
            try:
                client.release_concurrency_slots_with_lease(info["lease_id"])  # unknown lease: a no-op
            except Exception as err:  # noqa: BLE001 - the server frees it when the lease expires anyway
                log.warning("could not release the slot of %s: %s", _holder_text(info), err)
                continue
            say(f"released {_slots_text(info.get('count', 1))} of {folder.name} held by {_holder_text(info)}, "
                "which ended without releasing it")
        path.unlink(missing_ok=True)
    return live


def _register(folder: Path, lease_id: str, run: str, count: int) -> int:
    """Write and flock this holder's file; the fd is held until release. Written under another
    name and renamed once locked, so a waiter never takes a file being written for a dead one's."""
    tmp = folder / f".{lease_id}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    info = {"lease_id": lease_id, "run": run, "count": count, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.time()}
    os.write(fd, json.dumps(info).encode())
    os.replace(tmp, folder / f"{lease_id}.json")
    return fd


def _renew(lease_id: str, stop: threading.Event) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(LEASE_S * 0.75):
            try:
                client.renew_concurrency_lease(lease_id, LEASE_S)
            except Exception as err:  # noqa: BLE001 - next try in LEASE_S/4; the work goes on
                log.warning("could not renew the slot lease %s: %s", lease_id, err)


@contextlib.contextmanager
def slot(limit: str, run: str, say=log.info, timeout_s: float | None = None, count: int = 1) -> Iterator[None]:
    """Hold `count` slots of `limit` for the block, under one lease (no-op where the server has no
    such limit)."""
    import httpx
    from prefect import get_client
    from prefect.settings import get_current_settings

    timeout_s = slot_timeout_s() if timeout_s is None else timeout_s
    folder = registry(limit, get_current_settings().api.url or "")
    start = time.monotonic()
    said_at, said_whom = None, None
    with get_client(sync_client=True) as client:
        while True:
            live = reclaim(client, folder, say)
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[limit], slots=count, mode="concurrency", lease_duration=LEASE_S)
                break
            except httpx.HTTPStatusError as err:
                if err.response.status_code != 423:  # 423 Locked: every slot is taken
                    raise
                retry_after = float(err.response.headers.get("Retry-After", 2))
            whom = ", ".join(map(_holder_text, live)) or "a run this machine cannot see (another machine's)"
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise SlotTimeout(f"no {_slots_text(count)} of {limit} free after {waited:.0f} s (held by {whom}); raise "
                                  f"{SLOT_TIMEOUT_ENV}, or stop that run") from None
            if said_at is None or whom != said_whom or time.monotonic() - said_at >= REMIND_S:
                say(f"waiting for {_slots_text(count)} of {limit}: held by {whom} (giving up after {timeout_s:.0f} s, "
                    f"{SLOT_TIMEOUT_ENV})")
                said_at, said_whom = time.monotonic(), whom
            time.sleep(min(max(retry_after, 0.5), 5.0))
        body = response.json()
        if not body.get("limits"):  # no such limit on this server: nothing held
            with contextlib.suppress(Exception):
                client.release_concurrency_slots_with_lease(body["lease_id"])
            yield
            return
        lease_id = str(body["lease_id"])
        fd = _register(folder, lease_id, run, count)
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lease_id, stop), daemon=True, name="regdpo-slot-lease")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except Exception as err:  # noqa: BLE001 - the server frees it when the lease expires
                log.warning("could not release the slot lease %s: %s", lease_id, err)
            (folder / f"{lease_id}.json").unlink(missing_ok=True)
            os.close(fd)  # the flock goes with it
