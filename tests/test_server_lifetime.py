"""`regdpo run` as a user runs it (a real process with Prefect's temporary server).

- kill -9 of the run takes its temporary server with it (pipelines/lifetime.py);
- a run that fails on bad input prints one line naming the stage and the reason, no traceback;
- Ctrl-C / SIGTERM during training stop the run, its torchrun and its server, mark the runs
  Crashed, say how to resume, and the rerun resumes from the last checkpoint; a second Ctrl-C
  exits at once;
- the temporary server has a database of its own (a copy of a migrated template), and a start
  that fails ends on one line saying what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process_helpers import alive, checkpoints, step, terminal_sigint, tree, wait_for

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
        while time.monotonic() < deadline and (_port_open(port) or any(map(alive, children))):
            time.sleep(0.2)
        assert not _port_open(port), "the temporary server still listens after kill -9 of its run"
        assert not [pid for pid in children if alive(pid)]
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

    # the temporary server had a database of its own: Prefect's shared one under PREFECT_HOME (the
    # one `regdpo serve` uses) was never written; the migrated template was kept for the next run
    home = tmp_path / "prefect-home"
    assert not (home / "prefect.db").exists()
    assert [p.name for p in (home / "regdpo").glob("temporary-server-*.db")]

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
        while time.monotonic() < deadline and (_port_open(port) or any(map(alive, children))):
            time.sleep(0.2)
        assert not _port_open(port), "the server still listens after kill -9 of regdpo serve"
        assert not [pid for pid in children if alive(pid)], "workers or the server outlived regdpo serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _interrupt_training(root: Path, env: dict, sig: int, after: int,
                        extra: list[str]) -> tuple[subprocess.Popen, list[int], str]:
    """Start `regdpo run --stage train`, send `sig` once a checkpoint past step `after` exists,
    wait for the exit; returns the process, its tree and its stderr, once the whole tree is gone."""
    log = root / f"run-{sig}.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", "config.yaml", "--stage", "train", *extra], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=terminal_sigint)
    try:
        wait_for(lambda: any(step(c) > after for c in checkpoints(root)), 600,
                 f"checkpoint past step {after}", proc, log)
        pids = tree(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the foreground group
        else:
            proc.send_signal(sig)  # what Kubernetes and Prefect cancellation send: the process alone
        proc.wait(timeout=300)
        wait_for(lambda: not [p for p in pids if alive(p)], 60, "end of the process tree")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, pids, log.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_interrupted_training_stops_its_tree_and_the_rerun_resumes(encoded_workdir, tmp_path, prefect_harness):
    """Ctrl-C, then SIGTERM to the rerun: each stops its tree (torchrun, ranks, temporary server),
    says how to resume, and the rerun resumes from the last checkpoint. (A resumed run's result
    equals an uninterrupted one's: test_distributed.py.) Training never ends on its own here."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "w"
    shutil.copytree(encoded_workdir, root)

    # Ctrl-C: regdpo run, its temporary server, torchrun and both ranks are gone
    proc, pids, said = _interrupt_training(root, _env(tmp_path), signal.SIGINT, 0, ["--set", "train.num_processes=2"])
    assert proc.returncode == 128 + signal.SIGINT, said[-3000:]
    assert len(pids) >= 5, pids  # server, watchdog, torchrun, 2 ranks
    assert "Traceback" not in said, said[-3000:]
    first = checkpoints(root)[-1]
    resume = [ln for ln in said.splitlines() if ln.startswith("interrupted (Ctrl-C): ")]
    assert len(resume) == 1 and resume[0].endswith(
        "resume with: regdpo run config.yaml --stage train --set train.num_processes=2"), said[-2000:]

    # the rerun resumes from the last checkpoint; SIGTERM, on a server that outlives the run: the
    # runs it made end Crashed
    api = PREFECT_API_URL.value()
    proc, pids, said = _interrupt_training(root, {**_env(tmp_path), "PREFECT_API_URL": api}, signal.SIGTERM,
                                           step(first), [])
    assert f"resuming the interrupted run from {first}" in said, said[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    resume = [ln for ln in said.splitlines() if ln.startswith("interrupted (SIGTERM): ")]
    assert len(resume) == 1 and resume[0].endswith("resume with: regdpo run config.yaml --stage train"), said[-2000:]
    with get_client(sync_client=True) as client:
        config = str((root / "config.yaml").resolve())
        runs = [r for r in client.read_flow_runs() if r.parameters.get("config_path") == config]
    assert {r.name.split()[0] for r in runs} == {"pipeline", "train"}, [r.name for r in runs]
    assert all(r.state.is_crashed() for r in runs), [(r.name, r.state) for r in runs]
    assert not (root / "run" / "train").exists()  # nothing published


def test_a_second_ctrl_c_exits_at_once_and_the_server_still_stops(tmp_path):
    from tests.pipeline_helpers import small_config

    cfg = small_config(tmp_path)
    log = tmp_path / "run.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", str(cfg)], cwd=tmp_path, env=_env(tmp_path), text=True,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=terminal_sigint)
    try:
        wait_for(lambda: " - stages: " in log.read_text(), 600, "the pipeline flow's start", proc, log)
        port = int(re.search(r"temporary server on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        pids = tree(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        # the first is being handled (three runs to mark Crashed, then the server to stop): a second now
        wait_for(lambda: "Crash detected" in log.read_text(), 120, "first interrupt handled", proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 128 + signal.SIGINT, log.read_text()[-3000:]
        assert "interrupted again: exiting now" in log.read_text()
        wait_for(lambda: not _port_open(port) and not [p for p in pids if alive(p)], 60, "end of the server")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_temporary_server_that_does_not_start_ends_on_one_line(tmp_path):
    cfg = _config(tmp_path, "a.mp4,one\n")
    env = {**_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}  # no server starts in 1 s
    out = subprocess.run([str(REGDPO), "run", str(cfg), "--stage", "ingest"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    said = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert said == ["error: Prefect's temporary server did not answer within 1 s, 2 tries (a busy machine?): raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (e.g. 300), or start a server (regdpo serve) "
                    "and set PREFECT_API_URL"], out.stderr[-3000:]
