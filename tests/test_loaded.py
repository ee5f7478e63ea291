"""`make test-loaded` (tests/loaded.py): the hogs keep every core busy while pytest runs and are
gone afterwards, whether pytest ends, runs past the bound or the runner is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_of(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def _runner(tmp_path: Path, pytest_body: str, *extra: str) -> subprocess.Popen:
    test = tmp_path / "test_probe.py"
    test.write_text(pytest_body)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "loaded.py"), "--hogs", "2", *extra, "--",
                             "-q", "-p", "no:cacheprovider", str(test)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_hogs_burn_cpu_beside_pytest_and_stop_with_it(tmp_path):
    proc = _runner(tmp_path, "import time\n\ndef test_ok():\n    time.sleep(8)\n")
    _wait(lambda: len(_children_of(proc.pid)) == 3, 120, "pytest and two hogs")
    children = _children_of(proc.pid)
    hogs = [pid for pid in children if "-c" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")]
    assert len(hogs) == 2
    _wait(lambda: all(_cpu_ticks(pid) > 20 for pid in hogs), 60, "busy hogs")  # 0.2 s of CPU each
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "test-loaded: pytest exit 0" in err and "2 CPU hogs (all stopped)" in err
    assert not any(map(_alive, children))


def test_the_bound_and_ctrl_c_stop_pytest_and_the_hogs(tmp_path):
    slow = "import time\n\ndef test_slow():\n    time.sleep(600)\n"
    bounded = _runner(tmp_path, slow, "--timeout", "5")
    out, err = bounded.communicate(timeout=300)
    assert bounded.returncode == 124 and "stopped by the time bound (5 s)" in err, err

    interrupted = _runner(tmp_path, slow)
    # pytest and two hogs are up, then Ctrl-C
    _wait(lambda: len(_children_of(interrupted.pid)) == 3, 120, "pytest and two hogs")
    children = _children_of(interrupted.pid)
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130 and "stopped by SIGINT" in err, err
    _wait(lambda: not any(map(_alive, children)), 30, "end of pytest and the hogs")


def test_hogs_die_with_a_killed_runner(tmp_path):
    proc = _runner(tmp_path, "import time\n\ndef test_slow():\n    time.sleep(600)\n")
    _wait(lambda: len(_children_of(proc.pid)) == 3, 120, "pytest and two hogs")
    children = _children_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _wait(lambda: not any(map(_alive, children)), 30, "end of pytest and the hogs after kill -9")
