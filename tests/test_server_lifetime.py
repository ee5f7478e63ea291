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

ROOT = Path(__file__).resolve().parents[1]
REGDPO = Path(sys.executable).with_name("regdpo")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _terminal_sigint() -> None:
    """What a terminal gives its foreground job: Ctrl-C at its default (a test runner started in
    the background may have it ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: " + (log.read_text()[-3000:] if log else ""))
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s: " + (
            log.read_text()[-3000:] if log else "")
        time.sleep(0.2)


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
        while time.monotonic() < deadline and (_port_open(port) or any(map(_alive, children))):
            time.sleep(0.2)
        assert not _port_open(port), "the server still listens after kill -9 of regdpo serve"
        assert not [pid for pid in children if _alive(pid)], "workers or the server outlived regdpo serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    """A workdir with ingest, generate and encode done (two real clips, tiny model); tests copy it."""
    from regdpo.config import load_config
    from regdpo.stages import run
    from tests.pipeline_helpers import small_config

    root = tmp_path_factory.mktemp("encoded")
    path = small_config(root, train={"max_steps": 16, "checkpoint_every": 2, "batch_size": 2, "loader_workers": 0})
    cfg = load_config(path)
    for stage in ("ingest", "generate", "encode"):
        run(cfg, stage)
    return root


def _tree(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "run" / ".train.partial" / "checkpoints").glob("step-*[0-9]"))


def _interrupt_training(root: Path, env: dict, sig: int, after: int,
                        extra: list[str]) -> tuple[subprocess.Popen, list[int], str]:
    """Start `regdpo run --stage train`, send `sig` once a checkpoint past step `after` exists,
    wait for the exit; returns the process and its stderr, after checking the whole tree is gone."""
    log = root / f"run-{sig}.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", "config.yaml", "--stage", "train", *extra], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=_terminal_sigint)
    try:
        _wait(lambda: any(int(c.split("-")[1]) > after for c in _checkpoints(root)), 600,
              f"checkpoint past step {after}", proc, log)
        tree = _tree(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the foreground group
        else:
            proc.send_signal(sig)  # what Kubernetes and Prefect cancellation send: the process alone
        proc.wait(timeout=300)
        _wait(lambda: not [p for p in tree if _alive(p)], 60, "end of the process tree")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, tree, log.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_interrupted_training_stops_its_tree_and_the_rerun_resumes(encoded, tmp_path, prefect_harness):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "w"
    shutil.copytree(encoded, root)
    torchrun = ["--set", "train.num_processes=2"]

    # Ctrl-C: regdpo run, its temporary server, torchrun and both ranks are gone
    proc, tree, said = _interrupt_training(root, _env(tmp_path), signal.SIGINT, 0, torchrun)
    assert proc.returncode == 128 + signal.SIGINT, said[-3000:]
    assert len(tree) >= 5, tree  # server, watchdog, torchrun, 2 ranks
    assert "Traceback" not in said, said[-3000:]
    first = _checkpoints(root)[-1]
    resume = [ln for ln in said.splitlines() if ln.startswith("interrupted (Ctrl-C): ")]
    assert len(resume) == 1 and resume[0].endswith(
        "resume with: regdpo run config.yaml --stage train --set train.num_processes=2"), said[-2000:]

    # SIGTERM, on a server that outlives the run: the runs it made end Crashed
    api = PREFECT_API_URL.value()
    proc, tree, said = _interrupt_training(root, {**_env(tmp_path), "PREFECT_API_URL": api}, signal.SIGTERM,
                                           int(first.split("-")[1]), [])
    assert proc.returncode == 128 + signal.SIGTERM, said[-3000:]
    assert f"resuming the interrupted run from {first}" in said
    assert "interrupted (SIGTERM): " in said and "Traceback" not in said, said[-3000:]
    with get_client(sync_client=True) as client:
        config = str((root / "config.yaml").resolve())
        runs = [r for r in client.read_flow_runs() if r.parameters.get("config_path") == config]
    assert {r.name.split()[0] for r in runs} == {"pipeline", "train"}, [r.name for r in runs]
    assert all(r.state.is_crashed() for r in runs), [(r.name, r.state) for r in runs]

    # the rerun (the command it printed) resumes from the last checkpoint and finishes
    last = _checkpoints(root)[-1]
    out = subprocess.run([str(REGDPO), "run", "config.yaml", "--stage", "train"], cwd=root, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming the interrupted run from {last}" in out.stderr
    assert (root / "run" / "train" / "final").is_dir()


def test_a_second_ctrl_c_exits_at_once_and_the_server_still_stops(tmp_path):
    from tests.pipeline_helpers import small_config

    cfg = small_config(tmp_path)
    log = tmp_path / "run.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", str(cfg)], cwd=tmp_path, env=_env(tmp_path), text=True,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=_terminal_sigint)
    try:
        _wait(lambda: " - stages: " in log.read_text(), 600, "the pipeline flow's start", proc, log)
        port = int(re.search(r"temporary server on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        tree = _tree(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        # the first is being handled (three runs to mark Crashed, then the server to stop): a second now
        _wait(lambda: "Crash detected" in log.read_text(), 120, "first interrupt handled", proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 128 + signal.SIGINT, log.read_text()[-3000:]
        assert "interrupted again: exiting now" in log.read_text()
        _wait(lambda: not _port_open(port) and not [p for p in tree if _alive(p)], 60, "end of the server")
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
