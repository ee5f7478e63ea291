"""The test suite with every core busy: what CI and a shared laptop look like.

    make test-loaded                                   # the whole suite, a hog on every core
    .venv/bin/python tests/loaded.py -- -q tests/test_runner.py -k device   # any pytest arguments

One CPU hog (a busy loop) per core the process may run on, then pytest; the hogs are killed
when pytest ends, when the time bound passes, on Ctrl-C or SIGTERM, and die with this process
even after a kill -9 (PR_SET_PDEATHSIG), each also stopping on its own after the bound. The time
bound (REGDPO_LOADED_TIMEOUT_S, default 5400 s) interrupts pytest as Ctrl-C would, then kills
it. Exits with pytest's code (124 on the time bound) after one line saying how it went.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 60.0  # after an interrupt, pytest's own teardown (servers, device processes) gets this long
HOG = "import time\nend = time.monotonic() + {bound}\nwhile time.monotonic() < end:\n    pass\n"


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL it when this process dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_hogs(count: int, bound_s: float) -> list[subprocess.Popen]:
    """`count` busy loops, each in its own session (Ctrl-C at the terminal is ours to forward)."""
    return [subprocess.Popen([sys.executable, "-c", HOG.format(bound=bound_s)], start_new_session=True,
                             preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL) for _ in range(count)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_pytest(args: list[str], bound_s: float) -> int:
    """pytest in its own process group; interrupted (SIGINT to its group) on the bound or on our
    own SIGINT/SIGTERM, killed GRACE_S later. Returns its exit code, or 124 on the bound."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    stop_at = time.monotonic() + bound_s
    stopping = {"why": None}

    def on_signal(signum, frame) -> None:
        if stopping["why"] is not None:  # a second Ctrl-C: no more waiting
            _signal_group(proc, signal.SIGKILL)
            return
        stopping["why"] = signal.Signals(signum).name
        _signal_group(proc, signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupted_at = None
        while proc.poll() is None:
            now = time.monotonic()
            if stopping["why"] is None and now >= stop_at:
                stopping["why"] = f"the time bound ({bound_s:.0f} s)"
                _signal_group(proc, signal.SIGINT)
            if stopping["why"] is not None:
                interrupted_at = interrupted_at or now
                if now - interrupted_at > GRACE_S:
                    _signal_group(proc, signal.SIGKILL)
            time.sleep(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    if stopping["why"] is not None:
        print(f"test-loaded: pytest stopped by {stopping['why']}", file=sys.stderr)
        return 124 if stopping["why"].startswith("the time bound") else 130
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)),
                        help="busy loops to run beside the suite (default: one per usable core)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("REGDPO_LOADED_TIMEOUT_S", 5400)),
                        help="seconds before pytest is interrupted (REGDPO_LOADED_TIMEOUT_S)")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: -q tests)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    hogs = start_hogs(args.hogs, args.timeout + GRACE_S + 30)
    try:
        code = run_pytest(args.pytest_args or ["-q", "tests"], args.timeout)
    finally:
        stop(hogs)
    print(f"test-loaded: pytest exit {code} in {time.monotonic() - start:.0f} s with {args.hogs} CPU hogs "
          f"(all stopped)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
