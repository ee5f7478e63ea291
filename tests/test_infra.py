"""prefect.yaml, the pull step, infra/ (compose, Dockerfile, Kubernetes) stay consistent with the code.

prefect.yaml is checked with Prefect's own models; the compose file with `docker compose config`
or `docker-compose config` (no engine needed); Helm values and manifests are parsed (no helm here).
The real server run of prefect.yaml is test_deploy_server.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from regdpo.stages.registry import STAGE_LIST

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRET_REF = re.compile(r"^\$\{[A-Z_]+:\?[^}]+\}$")  # ${VAR:?message}: required, no default


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _deployments(prefect_yaml: dict) -> dict[str, dict]:
    names = [d["name"] for d in prefect_yaml["deployments"]]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    return {d["name"]: d for d in prefect_yaml["deployments"]}


def test_prefect_yaml_is_valid_and_pulls_from_the_project_dir(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with

    PrefectYamlModel.model_validate(prefect_yaml)
    assert prefect_yaml["pull"] == [{"pipelines.steps.set_project_dir": {"checkout": "{{ $REGDPO_CHECKOUT }}"}}]
    assert "/opt/regdpo" not in json.dumps(prefect_yaml["pull"])


def test_every_entrypoint_is_a_flow_and_parameters_fit(prefect_yaml):
    from prefect import Flow

    from pipelines import flows

    for name, dep in _deployments(prefect_yaml).items():
        path, _, attr = dep["entrypoint"].partition(":")
        assert path == "pipelines/flows.py", name
        fl = getattr(flows, attr, None)
        assert isinstance(fl, Flow), f"{name}: {dep['entrypoint']} is not a flow"
        params = dep.get("parameters", {})
        assert set(params) <= set(fl.parameters.properties), f"{name}: unknown parameters {set(params)}"
        assert dep["work_pool"]["name"] in {"cpu-pool", "gpu-pool"}, name
        assert dep["work_pool"]["job_variables"]["env"]["TQDM_DISABLE"] == "1"  # no bar spam in worker logs


def test_each_registry_stage_is_deployed_on_its_pool(prefect_yaml):
    deps = _deployments(prefect_yaml)
    for stage in STAGE_LIST:
        dep = deps[stage.name]
        assert dep["entrypoint"] == f"pipelines/flows.py:{stage.name}_flow"
        assert dep["work_pool"]["name"] == ("gpu-pool" if stage.gpu else "cpu-pool"), stage.name
        assert (ROOT / dep["parameters"]["config_path"]).is_file()
    assert deps["pipeline"]["entrypoint"] == "pipelines/flows.py:regdpo_pipeline"
    assert deps["work-item"]["entrypoint"] == "pipelines/flows.py:work_item_flow"
    assert deps["work-item"]["work_pool"]["name"] == "gpu-pool"
    from pipelines.flows import WORK_ITEM_DEPLOYMENT

    assert WORK_ITEM_DEPLOYMENT == "regdpo-work-item/work-item"


def test_nightly_ships_off_and_training_follows_new_pairs(prefect_yaml):
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from pipelines.deploy import NIGHTLY
    from pipelines.flows import PAIRS_EVENT

    deps = _deployments(prefect_yaml)
    pairs, train = deps["nightly-pairs"], deps["nightly-train"]
    assert {f"regdpo-pipeline/{d['name']}" for d in (pairs, train)} == set(NIGHTLY)
    assert pairs["parameters"]["stages"] == ["ingest", "generate", "encode"]
    assert train["parameters"]["stages"] == ["train", "evaluate"]
    for dep in (pairs, train):
        # a config the user sets (regdpo deploy --nightly), never the demo
        assert dep["parameters"]["config_path"] == "configs/nightly.yaml"
        assert not (ROOT / "configs" / "nightly.yaml").exists()
    (sched,) = pairs["schedules"]
    RawScheduleConfig.model_validate(sched)
    CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # raises on a bad cron/tz
    assert sched["active"] is False
    assert "schedules" not in train  # it runs on its trigger
    assert pairs["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert train["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    (trigger,) = train["triggers"]
    DeploymentEventTrigger.model_validate(trigger)
    assert trigger["expect"] == [PAIRS_EVENT]
    assert trigger["match_related"] == {"prefect.resource.role": "deployment", "prefect.resource.name": "nightly-pairs"}
    assert trigger["parameters"] == {"config_path": "{{ event.payload.config_path }}",
                                     "workdir": "{{ event.payload.workdir }}"}


def test_pull_step_finds_the_project_dir(tmp_path, monkeypatch):
    from pipelines import steps

    monkeypatch.delenv("REGDPO_HOME", raising=False)
    other = tmp_path / "checkout"
    (other / "pipelines").mkdir(parents=True)
    (other / "pipelines" / "flows.py").write_text("")
    assert steps.project_dir(str(other)) == other.resolve()  # the deploying checkout
    assert steps.project_dir("{{ $REGDPO_CHECKOUT }}") == ROOT  # unset placeholder: this environment's checkout
    assert steps.project_dir(str(tmp_path / "gone")) == ROOT
    monkeypatch.setenv("REGDPO_HOME", str(other))
    assert steps.project_dir(str(ROOT)) == other.resolve()  # the worker's own setting wins
    monkeypatch.setenv("REGDPO_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="REGDPO_HOME"):
        steps.project_dir(str(ROOT))
    monkeypatch.setenv("REGDPO_HOME", str(other))
    monkeypatch.chdir(tmp_path)
    assert steps.set_project_dir() == {"directory": str(other.resolve())} and Path.cwd() == other.resolve()


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as compose resolves it (`config`), with placeholder secrets."""
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")
    env = {**os.environ, "POSTGRES_PASSWORD": "pw", "PREFECT_AUTH_STRING": "admin:secret"}
    for var in ("PREFECT_DOMAIN", "GPU_DEVICE", "PREFECT_PORT"):
        env.pop(var, None)
    out = subprocess.run(cmd + ["--profile", "gpu", "config"], cwd=INFRA, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    missing = subprocess.run(cmd + ["config"], cwd=INFRA, capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "PREFECT_AUTH_STRING"})
    assert missing.returncode != 0 and "PREFECT_AUTH_STRING" in missing.stderr  # refuses without the secret
    return yaml.safe_load(out.stdout)


def test_compose_validates_with_gpu_worker_tls_auth_and_limits(compose):
    import prefect.settings

    services = compose["services"]
    assert {"postgres", "server", "proxy", "worker-cpu", "worker-gpu"} <= set(services)
    server, cpu, gpu, proxy = services["server"], services["worker-cpu"], services["worker-gpu"], services["proxy"]
    assert "--pool cpu-pool" in cpu["command"] and "--pool gpu-pool" in gpu["command"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == device["device_ids"][0]
    for svc in (cpu, gpu):
        assert svc["user"] == "1000:1000"
        assert any(":/opt/regdpo/runs" in str(v) or (isinstance(v, dict) and v.get("target") == "/opt/regdpo/runs")
                   for v in svc["volumes"])
        assert svc["environment"]["PREFECT_API_AUTH_STRING"] == "admin:secret"
        assert "PASSWORD" not in json.dumps(svc["environment"])  # the database password stays with the server
    for name, svc in services.items():
        assert svc.get("mem_limit") and svc.get("cpus"), f"{name} has no resource limits"
        assert "@sha256:" in svc.get("image", "") or re.search(r":\d+\.\d+", svc.get("image", "")), \
            f"{name}: image {svc.get('image')} is not pinned to an exact version"
    # only the TLS proxy listens beyond the host; the server's port is loopback-only
    (port,) = server["ports"]
    assert port.get("host_ip", "127.0.0.1") == "127.0.0.1" if isinstance(port, dict) else port.startswith("127.0.0.1:")
    assert "Caddyfile" in json.dumps(proxy["volumes"])
    caddy = (INFRA / "Caddyfile").read_text()
    assert "reverse_proxy server:4200" in caddy and "{$PREFECT_DOMAIN}" in caddy
    assert server["environment"]["PREFECT_UI_API_URL"].startswith("https://")
    for key in server["environment"]:
        if key.startswith("PREFECT_") and not key.startswith("PREFECT_SERVER_DATABASE"):
            assert hasattr(prefect.settings, key) or key in ("PREFECT_HOME",), f"{key} is not a Prefect setting"
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "admin:secret"


def test_compose_file_takes_secrets_from_the_environment_only():
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    for name, svc in raw["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key or "AUTH_STRING" in key:
                assert SECRET_REF.match(str(value)), f"{name}.{key} must come from the environment, got {value!r}"


def test_dockerfile_is_pinned_non_root_and_copies_real_paths():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M)
    assert re.search(r"^ARG TORCH=2\.13\.0$", text, re.M) and '"torch==$TORCH"' in text
    assert "pip install -c requirements/constraints.txt ." in text
    assert re.search(r"^USER 1000", text, re.M) and "REGDPO_HOME=/opt/regdpo" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # everything out, then what the image needs
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
                assert f"!{src}" in ignore, f".dockerignore leaves {src} out of the build context"


def test_kubernetes_values_and_manifests_parse():
    k8s = INFRA / "k8s"
    server = yaml.safe_load((k8s / "prefect-server-values.yaml").read_text())
    assert server["server"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-auth"}
    assert server["server"]["image"]["prefectTag"].startswith("3.8.8-")
    worker = yaml.safe_load((k8s / "prefect-worker-values.yaml").read_text())["worker"]
    assert worker["apiConfig"] == "selfHostedServer" and worker["config"]["type"] == "kubernetes"
    assert worker["selfHostedServerApiConfig"]["basicAuth"]["existingSecret"] == "prefect-auth"
    gpu = yaml.safe_load((k8s / "prefect-worker-gpu-values.yaml").read_text())["worker"]
    assert gpu["config"]["workPool"] == "gpu-pool"
    template = json.loads((k8s / "gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"image", "gpus", "workdir_claim"} <= set(template["variables"]["properties"])
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"]), placeholders - set(template["variables"]["properties"])
    docs = list(yaml.safe_load_all((k8s / "train-job.yaml").read_text()))
    (job,) = docs
    spec = job["spec"]["template"]["spec"]
    (train,) = spec["containers"]
    assert train["command"][:2] == ["regdpo", "run"] and train["command"][3:5] == ["--stage", "train"]
    procs = next(a for a in train["command"] if a.startswith("train.num_processes="))
    assert int(procs.split("=")[1]) == train["resources"]["limits"]["nvidia.com/gpu"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v} == \
        {d["metadata"]["name"] for d in yaml.safe_load_all((k8s / "volumes.yaml").read_text())}
