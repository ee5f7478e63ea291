"""`regdpo run` as a user runs it (a real process with Prefect's temporary server).

- kill -9 of the run takes its temporary server with it (pipelines/lifetime.py);
- a run that fails on bad input prints one line naming the stage and the reason, no traceback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGDPO = Path(sys.executable).with_name("regdpo")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent has not collected it yet
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _config(tmp_path: Path, manifest_rows: str) -> Path:
    (tmp_path / "manifest.csv").write_text("path,caption\n" + manifest_rows)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("workdir: ./run\nmodel: {preset: tiny, max_sequence_length: 16}\n"
                   "video: {fps: 8, num_frames: 9, height: 32, width: 32}\n"
                   "ingest: {manifest: ./manifest.csv, min_side: 32}\n")
    return cfg


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_regdpo_run_stops_its_temporary_server(tmp_path):
    from tests.pipeline_helpers import small_config

    cfg = small_config(tmp_path)  # a real run of tens of seconds: killed while it works
    proc = subprocess.Popen([str(REGDPO), "run", str(cfg)], cwd=tmp_path, env=_env(tmp_path), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        port, seen = None, []
        deadline = time.monotonic() + 180
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if not line and proc.poll() is not None:
                break
            m = re.search(r"^Prefect: temporary server on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port is not None, "regdpo run never said where its temporary server is: " + "".join(seen)[-3000:]
        assert _port_open(port)
        import psutil

        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert children, "the server runs as a child process"
        proc.kill()  # SIGKILL: no atexit, no finally
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (_port_open(port) or any(map(_alive, children))):
            time.sleep(0.2)
        assert not _port_open(port), "the temporary server still listens after kill -9 of its run"
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_failing_run_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "a.mp4").write_text("not a video")
    (tmp_path / "b.mp4").write_bytes(b"\x00" * 64)
    cfg = _config(tmp_path, "a.mp4,one\nb.mp4,two\n")
    out = subprocess.run([str(REGDPO), "run", str(cfg), "--stage", "ingest"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    said = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: ingest failed: ") and "manifest.csv" in said[0], said
    errors = [ln for ln in out.stderr.splitlines() if "ERROR" in ln or ln.startswith("error:")]
    assert len(errors) <= 4, errors  # the task's state, the stage's reason, the command's line (+ the unit's own)

    debug = subprocess.run([str(REGDPO), "run", str(cfg), "--stage", "ingest", "--debug"], cwd=tmp_path,
                           env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_regdpo_serve_stops_its_server_and_workers(tmp_path):
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(REGDPO), "serve", "--port", str(port)], env=_env(tmp_path), cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "UI: " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 4  # server, two workers, the watchdog (and their own children)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (_port_open(port) or any(map(_alive, children))):
            time.sleep(0.2)
        assert not _port_open(port), "the server still listens after kill -9 of regdpo serve"
        assert not [pid for pid in children if _alive(pid)], "workers or the server outlived regdpo serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
