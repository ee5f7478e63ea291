"""Prefect's API server for one `regdpo run`, started and stopped by us.

`regdpo run` with no API configured (no PREFECT_API_URL, no profile setting) needs a server for
the length of the run. Prefect would start its own on first use (`SubprocessASGIServer`: uvicorn
on `prefect.server.api.server:create_app`, waiting PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
default 20, for /health): in our process group, so a terminal's Ctrl-C kills it before the run
can record that it was interrupted; on the shared SQLite database under PREFECT_HOME, so every
run's server and `regdpo serve` write one file ("database is locked") and share concurrency
limits; and with a start-up budget a busy laptop misses. So we start the same command ourselves:

- in its own session (a Ctrl-C reaches the run, which stops the server last) and guarded by a
  watchdog (pipelines/lifetime.py) that stops it and removes its files if the run is killed;
- on a database of its own, a copy of a migrated template kept under PREFECT_HOME (creating
  Prefect's schema in a new SQLite file is most of a first start: ~70 s instead of ~20 s on a
  loaded 2-core machine); PREFECT_API_DATABASE_CONNECTION_URL, when set, is used instead;
- with a start-up timeout that fits a busy machine (120 s, or the PREFECT_SERVER_EPHEMERAL_
  STARTUP_TIMEOUT_SECONDS you set) and one retry on a fresh port; then one line saying what to do.

    server = TemporaryServer.start_if_needed()   # None when a server is configured
    ...                                          # (import the flows meanwhile)
    url = server.wait_ready()                    # raises ServerStartError (one line)
    ...
    server.stop()
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from pipelines.lifetime import die_with_me, terminate

STARTUP_TIMEOUT_S = 120  # per attempt, where PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is not set
ATTEMPTS = 2


class ServerStartError(RuntimeError):
    """The temporary server did not come up; the message is one line saying what to do."""


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect sees it (environment, profile, or a test harness)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def prefect_command() -> list[str]:
    """The `prefect` CLI of this environment."""
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Block until GET <url>/health answers 200; a clear error if the server dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before it was ready")
        if is_healthy(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {url} did not answer within {timeout_s:.0f} s")


def startup_timeout_s() -> int:
    """Seconds one start may take: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when you set it
    (environment or profile), else ours (Prefect's default of 20 s is missed on a busy laptop)."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    return ephemeral.startup_timeout_seconds if "startup_timeout_seconds" in ephemeral.model_fields_set \
        else STARTUP_TIMEOUT_S


def _own_database() -> bool:
    """Whether the temporary server gets a database of its own (no PREFECT_API_DATABASE_CONNECTION_URL set)."""
    from prefect.settings import get_current_settings

    return "connection_url" not in get_current_settings().server.database.model_fields_set


def template_path() -> Path:
    """A migrated, empty database for this Prefect version, copied for each temporary server."""
    import prefect
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / "regdpo" / f"temporary-server-{prefect.__version__}.db"


def _save_template(db: Path, template: Path) -> None:
    """Snapshot a just-started (migrated, still empty) database as the template; best effort."""
    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        src, dst = sqlite3.connect(db), sqlite3.connect(tmp)
        try:
            src.backup(dst)  # consistent even while the server writes (WAL)
        finally:
            src.close()
            dst.close()
        os.replace(tmp, template)
    except (OSError, sqlite3.Error):
        tmp.unlink(missing_ok=True)


def drain_clients(timeout_s: float = 10) -> None:
    """Send this process's queued run logs and events now, while the server still answers (Prefect
    would send them at exit, after the temporary server has stopped)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - best effort: the run's result does not depend on it
            pass


class TemporaryServer:
    """Prefect's server for the length of one run (see the module docstring)."""

    def __init__(self, timeout_s: float | None = None, attempts: int = ATTEMPTS):
        self.timeout_s = float(timeout_s if timeout_s is not None else startup_timeout_s())
        self.attempts = attempts
        self.dir = Path(tempfile.mkdtemp(prefix="regdpo-prefect-server-"))
        self.log_path = self.dir / "server.log"
        self.db = self.dir / "prefect.db" if _own_database() else None
        self.template = template_path() if self.db is not None else None
        self.fresh_template = False
        self.process: subprocess.Popen | None = None
        self.guard: subprocess.Popen | None = None
        self.port = 0

    @classmethod
    def start_if_needed(cls, timeout_s: float | None = None) -> TemporaryServer | None:
        """Start one (without waiting for it) unless a server is configured."""
        if configured_api_url():
            return None
        server = cls(timeout_s)
        server._spawn()
        return server

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _env(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               # what Prefect's own temporary server sets: no UI, the ephemeral set of services
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        if self.db is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.db}"
        return env

    def _spawn(self) -> None:
        if self.db is not None and not self.db.exists():
            if self.template is not None and self.template.is_file():
                shutil.copyfile(self.template, self.db)
            else:
                self.fresh_template = True
        self.port = free_port()
        app_dir = str(Path(find_spec("prefect").origin).parent.parent)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own group: a terminal's Ctrl-C goes to the run, not to it
        if self.guard is not None:
            self.guard.kill()
            self.guard.wait()
        self.guard = die_with_me(groups=[self.process.pid], remove=[self.dir])

    def _wait_once(self) -> bool:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if is_healthy(self.api_url):
                return True
            time.sleep(0.5)
        return False

    def wait_ready(self) -> str:
        """The API URL once the server answers; one retry on a fresh port; ServerStartError after that."""
        for attempt in range(1, self.attempts + 1):
            if self._wait_once():
                if self.fresh_template and self.db is not None:
                    _save_template(self.db, self.template)
                return self.api_url
            code = self.process.poll()
            terminate([], [self.process.pid])
            self.process.wait()
            if attempt < self.attempts:
                self._spawn()
        why = (f"exited with code {code}" if code is not None
               else f"did not answer within {self.timeout_s:.0f} s, {self.attempts} tries")
        raise ServerStartError(
            f"Prefect's temporary server {why} (a busy machine?): raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            f"(e.g. {max(300, int(self.timeout_s) * 2)}), or start a server (regdpo serve) and set PREFECT_API_URL")

    def output_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and remove its files (its database with them)."""
        if self.process is not None and self.process.poll() is None:
            drain_clients()
            terminate([], [self.process.pid])
            self.process.wait()
        if self.guard is not None:
            self.guard.kill()
            self.guard.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
