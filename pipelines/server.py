"""Prefect servers for one machine: the temporary one behind `regdpo run`, and `regdpo serve`.

`regdpo run` with no API configured (no PREFECT_API_URL, no profile setting) starts Prefect's
own temporary server (SQLite, loopback, a free port) before the flow needs it, and a watchdog
(pipelines/lifetime.py) that stops it if the run is killed, kill -9 included.

`regdpo serve` is for a person on one machine who wants the UI, deployments and schedules:
a real `prefect server start` on loopback, the work pools and the global GPU limit, and one
process worker per pool; Ctrl-C (or killing `regdpo serve` in any way) stops all of them.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.lifetime import die_with_me, terminate

Echo = Callable[[str], None]
CPU_POOL, GPU_POOL = "cpu-pool", "gpu-pool"  # the pool names prefect.yaml's deployments use
GPU_LIMIT = "regdpo-gpu"


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect sees it (environment, profile, or a test harness)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def ensure_api(echo: Echo) -> str:
    """The API URL this process will use; starts the temporary server (guarded) when none is set."""
    url = configured_api_url()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    # The same singleton Prefect's clients start on first use: starting it here lets us guard it.
    server = SubprocessASGIServer()
    server.start()
    if server.server_process is not None:
        die_with_me(pids=[server.server_process.pid])
    echo(f"Prefect: temporary server on {server.address} (stops with this run; PREFECT_API_URL selects yours)")
    return server.api_url


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


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Block until GET <url>/health answers 200; a clear error if the server dies or times out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before it was ready "
                               "(its output is above)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {url} did not answer within {timeout_s:.0f} s")


def gpu_count() -> int:
    """Visible NVIDIA GPUs (nvidia-smi -L), 0 when there is none or no driver."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def ensure_pools(gpu_slots: int, echo: Echo) -> None:
    """Create the process work pools and the GPU limit when missing (existing ones are left as they are)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in (CPU_POOL, GPU_POOL):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                echo(f"created work pool {name} (process)")
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=max(1, gpu_slots)))
            echo(f"created global concurrency limit {GPU_LIMIT} ({max(1, gpu_slots)} slot(s): one per GPU)")


@dataclass
class Child:
    name: str
    process: subprocess.Popen


def _start(name: str, args: list[str], env: dict[str, str]) -> Child:
    # Its own process group, so stopping it also stops the flow-run processes a worker started.
    return Child(name, subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True))


def serve(host: str, port: int, cpu_limit: int, gpu_limit: int | None, echo: Echo) -> int:
    """Run a server and a worker per pool until Ctrl-C or until one of them exits; returns an exit code."""
    if not is_loopback(host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise ValueError(f"--host {host} serves beyond this machine: set PREFECT_SERVER_API_AUTH_STRING=user:password "
                         "(and PREFECT_API_AUTH_STRING for clients), or use infra/ for a shared server")
    gpus = gpu_count()
    gpu_limit = gpu_limit if gpu_limit is not None else max(1, gpus)
    api = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
           os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        env.setdefault("PREFECT_API_AUTH_STRING", os.environ["PREFECT_SERVER_API_AUTH_STRING"])
    children: list[Child] = []
    guard = None
    try:
        server = _start("server", prefect_command() + ["server", "start", "--host", host, "--port", str(port)], env)
        children.append(server)
        guard = die_with_me(groups=[server.process.pid])
        echo(f"starting the Prefect server on {host}:{port} ...")
        wait_healthy(api, 120, server.process)
        os.environ["PREFECT_API_URL"] = api  # this process's client (pools) talks to it too
        if "PREFECT_API_AUTH_STRING" in env:
            os.environ["PREFECT_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"]
        ensure_pools(gpu_limit, echo)
        # The GPU worker takes one run more than there are GPU slots: GPU work holds a slot of
        # the regdpo-gpu limit, and a stage run that fans its work items out (fan_out:
        # deployments) waits for them without one, so it must not take the last run slot.
        for pool, limit in ((CPU_POOL, cpu_limit), (GPU_POOL, gpu_limit + 1)):
            child = _start(f"{pool} worker", prefect_command() + ["worker", "start", "--pool", pool, "--type", "process",
                                                                   "--limit", str(limit)], env)
            children.append(child)
        guard.kill()  # replace the watchdog with one that guards every child
        guard = die_with_me(groups=[c.process.pid for c in children])
        echo(f"UI: {api.removesuffix('/api')}   workers: {CPU_POOL} (limit {cpu_limit}), {GPU_POOL} (limit "
             f"{gpu_limit + 1}, {gpu_limit} GPU slot(s){', no GPU found' if not gpus else ''})")
        echo(f"in another shell:  export PREFECT_API_URL={api}  &&  regdpo deploy   (Ctrl-C here stops everything)")
        while True:
            for child in children:
                if child.process.poll() is not None:
                    echo(f"the {child.name} exited with code {child.process.returncode}; stopping the others")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        echo("stopping the workers and the server ...")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        terminate([], [c.process.pid for c in children])
        for child in children:
            child.process.wait()
        if guard is not None:
            guard.kill()
            guard.wait()
