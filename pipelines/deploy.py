"""`regdpo deploy`: register prefect.yaml's deployments on the server at PREFECT_API_URL.

    regdpo deploy                              # pools + GPU limit if missing, then every deployment
    regdpo deploy --nightly configs/mine.yaml  # ... and point the nightly pair at your config, schedule on

What it runs is Prefect's own `prefect --no-prompt deploy --all` in the project directory, with
REGDPO_CHECKOUT set to it: prefect.yaml's pull step (pipelines/steps.py) takes it as the
project directory of workers that have no REGDPO_HOME of their own. The nightly deployments ship
with their schedule off and a config path that does not exist (configs/nightly.yaml); `--nightly`
sets their config and turns the schedule on, through the Prefect client, after deploying (a
redeploy resets both, so pass `--nightly` again each time).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from pipelines.serve import ensure_pools
from pipelines.server import configured_api_url, prefect_command, wait_healthy

Echo = Callable[[str], None]
NIGHTLY = ("regdpo-pipeline/nightly-pairs", "regdpo-pipeline/nightly-train")


def project_root() -> Path:
    """The checkout this command runs from (where prefect.yaml is)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "prefect.yaml").is_file():
        raise ValueError(f"no prefect.yaml in {root}: run `regdpo deploy` from a regdpo checkout "
                         "(pip install -e . there), or `prefect deploy --all` in the project directory")
    return root


def deploy(nightly: Path | None, gpu_slots: int, echo: Echo) -> list[str]:
    """Deploy everything; returns the deployment names. Errors are ValueError/RuntimeError with one-line messages."""
    url = configured_api_url()
    if not url:
        raise ValueError("no Prefect server to deploy to: set PREFECT_API_URL (e.g. the one `regdpo serve` prints, "
                         "or your infra server's https://<host>/api with PREFECT_API_AUTH_STRING)")
    if nightly is not None and not nightly.is_file():
        raise ValueError(f"--nightly {nightly}: config file not found")
    try:
        wait_healthy(url, 15)
    except RuntimeError as err:
        raise RuntimeError(f"{err}; is the server running (regdpo serve), and PREFECT_API_URL right?") from None
    root = project_root()
    ensure_pools(gpu_slots, echo)
    env = {**os.environ, "REGDPO_CHECKOUT": str(root), "PREFECT_API_URL": url}
    proc = subprocess.run(prefect_command() + ["--no-prompt", "deploy", "--all", "--prefect-file", str(root / "prefect.yaml")],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"prefect deploy failed (exit {proc.returncode}):\n{tail}")
    names = _deployed_names()
    echo(f"deployed {len(names)} deployments to {url} (project directory {root})")
    if nightly is not None:
        set_nightly(nightly.resolve(), echo)
    else:
        echo("nightly schedules are off: `regdpo deploy --nightly CONFIG` points them at your config and turns them on")
    return names


def _deployed_names() -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())


def set_nightly(config: Path, echo: Echo) -> None:
    """Point the nightly deployments at `config` and turn their schedules on."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for name in NIGHTLY:
            dep = client.read_deployment_by_name(name)
            client.update_deployment(dep.id, DeploymentUpdate(parameters={**(dep.parameters or {}),
                                                                          "config_path": str(config)}))
            for schedule in dep.schedules:
                client.update_deployment_schedule(dep.id, schedule.id, active=True)
            what = f"{len(dep.schedules)} schedule(s) on" if dep.schedules else "runs on its trigger"
            echo(f"{name}: config {config}, {what}")
