"""`regdpo serve`: one machine's Prefect server with its UI, the work pools, the GPU limit and a
worker per pool; Ctrl-C (or killing `regdpo serve` in any way) stops all of them.

Its server keeps Prefect's own database (PREFECT_HOME, or PREFECT_API_DATABASE_CONNECTION_URL):
the temporary servers of `regdpo run` never write there (pipelines/server.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.lifetime import die_with_me, terminate
from pipelines.server import is_loopback, prefect_command, wait_healthy

Echo = Callable[[str], None]
CPU_POOL, GPU_POOL = "cpu-pool", "gpu-pool"  # the pool names prefect.yaml's deployments use
GPU_LIMIT = "regdpo-gpu"


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


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"  # leases outlive a server restart
BACKOFF_S = (1, 2, 5, 10, 30, 60)  # wait before the n-th restart in a row of a child that keeps dying
STEADY_S = 300.0  # a child up this long starts its back-off over


@dataclass
class Child:
    name: str
    args: list[str]
    pool: str | None = None  # the work pool of a worker
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0  # in a row
    restart_at: float | None = None


def _start(child: Child, env: dict[str, str]) -> None:
    # Its own process group, so stopping it also stops what it started in that group.
    child.process = subprocess.Popen(child.args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    child.started, child.restart_at = time.monotonic(), None


def _local_pid(infrastructure_pid: str | None) -> int | None:
    """The pid of a flow run started on this machine ('host:pid' or 'pid'), else None."""
    host, _, pid = (infrastructure_pid or "").rpartition(":")
    if not pid.isdigit() or (host and host != socket.gethostname()):
        return None
    return int(pid)


def crash_orphaned_runs(pool: str, worker: str) -> list[str]:
    """After the pool's worker died: end the flow-run processes it started on this machine (they
    would run on unsupervised, holding the workdir lock) and mark those runs Crashed."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
        runs = [r for r in runs if _local_pid(r.infrastructure_pid) is not None]
        terminate([], [_local_pid(r.infrastructure_pid) for r in runs])  # each run process leads its group
        for r in runs:
            client.set_flow_run_state(r.id, Crashed(message=f"the {worker} that ran it died; its process was "
                                                            "stopped"), force=True)
    return [r.name for r in runs]


def serve(host: str, port: int, cpu_limit: int, gpu_limit: int | None, echo: Echo) -> int:
    """Run a server and a worker per pool until Ctrl-C or SIGTERM; a child that dies is restarted
    (after a back-off, said on one line). Returns an exit code."""
    if not is_loopback(host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise ValueError(f"--host {host} serves beyond this machine: set PREFECT_SERVER_API_AUTH_STRING=user:password "
                         "(and PREFECT_API_AUTH_STRING for clients), or use infra/ for a shared server")
    gpus = gpu_count()
    gpu_limit = gpu_limit if gpu_limit is not None else max(1, gpus)
    api = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
           os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
                                                                      LEASE_STORAGE)}
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        env.setdefault("PREFECT_API_AUTH_STRING", os.environ["PREFECT_SERVER_API_AUTH_STRING"])
    server = Child("server", prefect_command() + ["server", "start", "--host", host, "--port", str(port)])
    # The GPU worker takes one run more than there are GPU slots: GPU work holds a slot of
    # the regdpo-gpu limit, and a stage run that fans its work items out (fan_out:
    # deployments) waits for them without one, so it must not take the last run slot.
    workers = [Child(f"{pool} worker", prefect_command() + ["worker", "start", "--pool", pool, "--type", "process",
                                                           "--limit", str(limit)], pool=pool)
               for pool, limit in ((CPU_POOL, cpu_limit), (GPU_POOL, gpu_limit + 1))]
    children: list[Child] = []
    guard = None
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # kill, Kubernetes: stop as Ctrl-C does
    try:
        _start(server, env)
        children.append(server)
        guard = die_with_me(groups=[server.process.pid])
        echo(f"starting the Prefect server on {host}:{port} ...")
        wait_healthy(api, 120, server.process)
        os.environ["PREFECT_API_URL"] = api  # this process's client (pools, crash marks) talks to it too
        if "PREFECT_API_AUTH_STRING" in env:
            os.environ["PREFECT_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"]
        ensure_pools(gpu_limit, echo)
        for child in workers:
            _start(child, env)
            children.append(child)
        guard = _guard_all(guard, children)
        echo(f"UI: {api.removesuffix('/api')}   workers: {CPU_POOL} (limit {cpu_limit}), {GPU_POOL} (limit "
             f"{gpu_limit + 1}, {gpu_limit} GPU slot(s){', no GPU found' if not gpus else ''})")
        echo(f"in another shell:  export PREFECT_API_URL={api}  &&  regdpo deploy   (Ctrl-C here stops everything)")
        while True:
            for child in children:
                if _supervise(child, env, api, echo):
                    guard = _guard_all(guard, children)
            time.sleep(1)
    except KeyboardInterrupt:
        echo("stopping the workers and the server ...")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminate([], [c.process.pid for c in children if c.process is not None])
        for child in children:
            child.process.wait()
        if guard is not None:
            guard.kill()
            guard.wait()
        signal.signal(signal.SIGTERM, previous_term)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _guard_all(guard: subprocess.Popen | None, children: list[Child]) -> subprocess.Popen:
    """A watchdog over every child's current process (replacing the previous one)."""
    new = die_with_me(groups=[c.process.pid for c in children if c.process is not None])
    if guard is not None:
        guard.kill()
        guard.wait()
    return new


def _supervise(child: Child, env: dict[str, str], api: str, echo: Echo) -> bool:
    """Restart `child` if it died, after its back-off; True when a new process was started."""
    now = time.monotonic()
    if child.restart_at is None:
        code = child.process.poll()
        if code is None:
            return False
        terminate([], [child.process.pid])  # whatever it left in its group
        if now - child.started >= STEADY_S:
            child.restarts = 0
        delay = BACKOFF_S[min(child.restarts, len(BACKOFF_S) - 1)]
        crashed = ""
        if child.pool is not None:
            try:
                names = crash_orphaned_runs(child.pool, child.name)
                crashed = f"; its flow runs marked Crashed: {', '.join(names)}" if names else ""
            except Exception as err:  # noqa: BLE001 - the server may be the one that died
                crashed = f"; could not check its flow runs ({type(err).__name__}: {err})"
        echo(f"the {child.name} exited with code {code}{crashed}; restarting it in {delay} s "
             f"(restart {child.restarts + 1} in a row)")
        child.restart_at = now + delay
        return False
    if now < child.restart_at:
        return False
    child.restarts += 1
    _start(child, env)
    if child.name == "server":
        wait_healthy(api, 120, child.process)
    echo(f"the {child.name} is running again (pid {child.process.pid})")
    return True
