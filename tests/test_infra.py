"""prefect.yaml, infra/docker-compose.yml and infra/Dockerfile stay consistent with the code.

Parsed with yaml.safe_load (as Prefect and compose read them) and checked against the real flows
and Prefect's own settings and schedule models; no server, no docker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET_REF = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")  # ${VAR:?message}: required, no default
GPU_STAGES = {"generate", "encode", "train"}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())


def _deployments(prefect_yaml: dict) -> dict[str, dict]:
    deps = prefect_yaml["deployments"]
    names = [d["name"] for d in deps]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    return {d["name"]: d for d in deps}


def test_prefect_yaml_is_valid_for_prefect_deploy(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert len(model.deployments) == len(prefect_yaml["deployments"])
    steps = [next(iter(step)) for step in prefect_yaml["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"]


def test_every_entrypoint_is_a_flow_and_parameters_fit(prefect_yaml):
    from prefect import Flow

    from pipelines import flows
    from regdpo.stages.runner import STAGES

    for name, dep in _deployments(prefect_yaml).items():
        path, _, attr = dep["entrypoint"].partition(":")
        assert (ROOT / path).is_file() and path == "pipelines/flows.py", name
        fl = getattr(flows, attr, None)
        assert isinstance(fl, Flow), f"{name}: {dep['entrypoint']} is not a flow"
        params = dep.get("parameters", {})
        assert "config_path" in params, name
        assert set(params) <= set(fl.parameters.properties), f"{name}: unknown parameters {set(params)}"
        assert (ROOT / params["config_path"]).is_file(), f"{name}: {params['config_path']} not in the repo"
        assert set(params.get("stages") or []) <= set(STAGES), name
        assert dep["work_pool"]["name"] in {"cpu-pool", "gpu-pool"}, name


def test_whole_dag_and_each_stage_are_deployed_on_the_right_pool(prefect_yaml):
    from pipelines import flows

    deps = _deployments(prefect_yaml)
    by_flow = {dep["entrypoint"].partition(":")[2]: dep for dep in deps.values() if "stages" not in dep["parameters"]}
    assert "regdpo_pipeline" in by_flow
    for stage, fl in flows.STAGE_FLOWS.items():
        dep = by_flow[fl.fn.__name__]
        if stage in GPU_STAGES:
            assert dep["work_pool"]["name"] == "gpu-pool", stage
    assert by_flow["ingest_flow"]["work_pool"]["name"] == "cpu-pool"


def test_nightly_schedules(prefect_yaml):
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    scheduled = {}
    for dep in prefect_yaml["deployments"]:
        for sched in dep.get("schedules") or []:
            RawScheduleConfig.model_validate(sched)
            cron = CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # raises on a bad cron/tz
            assert cron.timezone == "UTC"
            scheduled[tuple(dep["parameters"]["stages"])] = sched["cron"]
    assert scheduled == {("ingest", "generate", "encode"): "0 1 * * *", ("train", "evaluate"): "0 5 * * *"}


def test_compose_server_postgres_auth_and_worker(compose, monkeypatch):
    import prefect.settings

    services = compose["services"]
    assert {"postgres", "server", "worker"} <= set(services)
    server, worker, postgres = services["server"], services["worker"], services["postgres"]

    assert "prefect server start" in server["command"] and "--host 0.0.0.0" in server["command"]
    assert "postgres" in server["depends_on"]
    assert SECRET_REF.match(postgres["environment"]["POSTGRES_PASSWORD"])
    assert "--pool cpu-pool" in worker["command"] and "--type process" in worker["command"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://server:4200/api"

    for svc in (server, worker):
        for key, value in svc["environment"].items():
            if key.startswith("PREFECT_"):
                assert hasattr(prefect.settings, key), f"{key} is not a Prefect setting"
            if "PASSWORD" in key or "AUTH_STRING" in key:
                assert SECRET_REF.match(str(value)), f"{key} must come from the environment, got {value!r}"

    # What the server process would see, read by Prefect's own settings model.
    for key, value in server["environment"].items():
        monkeypatch.setenv(key, "user:secret" if SECRET_REF.match(str(value)) else re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    settings = prefect.settings.Settings()
    assert settings.server.api.auth_string is not None
    assert settings.server.database.driver == "postgresql+asyncpg"
    assert settings.server.database.host == "postgres"
    assert "PREFECT_API_AUTH_STRING" in worker["environment"]

    build = worker["build"]
    assert (ROOT / "infra" / build["context"] / build["dockerfile"]).resolve() == ROOT / "infra" / "Dockerfile"


def test_dockerfile_installs_with_constraints_and_copies_real_paths():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert "pip install -c requirements/constraints.txt ." in text
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
