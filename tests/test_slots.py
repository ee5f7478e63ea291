"""Dead holders of a concurrency slot are found without a server: pipelines/slots.py's registry
(a flocked file per lease) against holders that live, die, or die leaving a forked child that
keeps the flock. The releases against a real server: test_deploy_server.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import slots
from tests.process_helpers import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# Registers a lease like a holder does, optionally forks a child that inherits the locked file
# (what a device process started mid-stage does), says "held" and waits until told to exit.
HOLDER = """
import os, sys, time
from pathlib import Path
from pipelines import slots
folder, lease, fork = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "fork"
slots._register(folder, lease, "generate w", 1)
if fork and os.fork() == 0:
    time.sleep(600)
    os._exit(0)
print("held", flush=True)
sys.stdin.readline()
"""


class _Client:
    def __init__(self):
        self.released: list[str] = []

    def release_concurrency_slots_with_lease(self, lease_id):
        self.released.append(lease_id)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1]


def _holder(folder: Path, lease: str, fork: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), lease, "fork" if fork else "no"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_reclaim_releases_dead_holders_and_keeps_live_ones(tmp_path):
    """Live: kept. kill -9: released. Exited while a forked child keeps its flock, and left a
    zombie nobody reaps (an orphan in a container): released too, the child's lock notwithstanding."""
    live, killed, zombie = (_holder(tmp_path, name, fork=name == "zombie") for name in ("live", "killed", "zombie"))
    try:
        killed.kill()
        killed.wait()
        zombie.stdin.write("\n")
        zombie.stdin.flush()
        # not waited for: a zombie until the end of the test; its forked child still holds the lock
        wait_for(lambda: _state(zombie.pid) == "Z", 60, "the holder's exit")  # kill(pid, 0) still finds it

        client, said = _Client(), []
        left = slots.reclaim(client, tmp_path, say=said.append)
        assert sorted(client.released) == ["killed", "zombie"], said
        assert [info["lease_id"] for info in left] == ["live"]
        assert sorted(p.name for p in tmp_path.glob("*.json")) == ["live.json"]
        assert all(line.startswith("released a slot of ") and "generate w (pid " in line for line in said), said
    finally:
        for proc in (live, killed, zombie):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the holder and its forked child (same session)
            proc.wait()
