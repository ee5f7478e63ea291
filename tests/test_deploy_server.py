"""The README's deployment path on a plain checkout, against a REAL Prefect server.

One module-scoped `regdpo serve` (a real `prefect server start` on loopback, a free port, a
temporary PREFECT_HOME, analytics off, plus a process worker per pool), then `regdpo deploy`,
then deployment runs picked up by those workers, as a person would do it. About three minutes:
the tiny demo model, few steps, a few clips.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process_helpers import alive, checkpoints, wait_for

ROOT = Path(__file__).resolve().parents[1]
REGDPO = Path(sys.executable).with_name("regdpo")
SAMPLES = ROOT / "data" / "samples"
CLIPS = ["cartoon_hills_pan.mp4", "snowy_traveler.mp4", "airplane_field.mp4"]  # demo: 2 held out, 1 to train

pytestmark = pytest.mark.prefect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`regdpo serve` on a free loopback port; yields (api url, env for commands, its log path)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "REGDPO_HOME")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # real settings, shortened so the test waits seconds, not minutes
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="5")
    log = home / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(REGDPO), "serve", "--port", str(port), "--cpu-limit", "2", "--gpu-limit", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    try:
        deadline = time.monotonic() + 180
        while "UI: " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api, {**env, "PREFECT_API_URL": api}, log
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve stops its workers and the server
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the server outlived regdpo serve"


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """The README's command: `regdpo deploy --nightly CONFIG` from the checkout."""
    api, env, log = server
    nightly = tmp_path_factory.mktemp("nightly") / "nightly.yaml"
    shutil.copy(ROOT / "configs" / "demo.yaml", nightly)
    nightly.write_text(nightly.read_text().replace("../runs/demo", str(nightly.parent / "run"))
                       .replace("../data/samples", str(SAMPLES)))
    out = subprocess.run([str(REGDPO), "deploy", "--nightly", str(nightly)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path_factory.getbasetemp())
    assert out.returncode == 0, out.stdout + out.stderr + log.read_text()[-3000:]
    return nightly, out.stdout


@pytest.fixture
def inputs(tmp_path) -> dict:
    """Parameters for the demo config on four sample clips and one missing file (a reject)."""
    data = tmp_path / "videos"
    data.mkdir()
    for name in CLIPS:
        shutil.copy(SAMPLES / name, data / name)
    rows = [f"{name},a caption for {name}" for name in CLIPS] + ["missing.mp4,a file that is not there"]
    (data / "manifest.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    return {"config_path": "configs/demo.yaml", "workdir": str(tmp_path / "run"),
            "overrides": {"ingest.manifest": str(data / "manifest.csv"), "generate.num_inference_steps": 2,
                          "evaluate.samples.num_inference_steps": 2, "evaluate.samples.num_samples": 1}}


def _run(name: str, parameters: dict, timeout_s: float = 600):
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters, timeout=timeout_s)


def _logs(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])), limit=200)]


def test_deploy_registers_everything_and_the_scheduler_creates_the_nightly_runs(deployed):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    nightly, said = deployed
    assert "nightly-pairs" in said and "regdpo-pipeline/pipeline" in said
    with get_client(sync_client=True) as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        assert {"regdpo-pipeline/pipeline", "regdpo-ingest/ingest", "regdpo-train/train", "regdpo-work-item/work-item",
                "regdpo-pipeline/nightly-pairs", "regdpo-pipeline/nightly-train"} <= names
        pipe = client.read_deployment_by_name("regdpo-pipeline/pipeline")
        stages = pipe.parameter_openapi_schema["properties"]["stages"]
        assert stages["anyOf"][0]["items"]["enum"] == ["ingest", "generate", "encode", "train", "evaluate"]
        pairs = client.read_deployment_by_name("regdpo-pipeline/nightly-pairs")
        assert pairs.parameters["config_path"] == str(nightly)
        assert pairs.schedules and all(s.active for s in pairs.schedules)
        assert pairs.global_concurrency_limit.limit == 1
        assert pairs.concurrency_options.collision_strategy == "CANCEL_NEW"
        assert client.read_deployment_by_name("regdpo-pipeline/nightly-train").parameters["config_path"] == str(nightly)

        deadline = time.monotonic() + 120
        runs = []
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["nightly-pairs"])))
            time.sleep(2)
    assert runs, "the scheduler created no nightly run within two minutes"
    assert all(r.state.is_scheduled() and "auto-scheduled" in r.tags for r in runs)


def test_a_stage_deployment_run_redoes_its_stage(deployed, inputs):
    stage_json = Path(inputs["workdir"]) / "ingest" / "stage.json"
    first = _run("regdpo-ingest/ingest", inputs)
    assert first.state.is_completed(), first.state
    rec1 = json.loads(stage_json.read_text())
    second = _run("regdpo-ingest/ingest", inputs)
    assert second.state.is_completed(), second.state
    rec2 = json.loads(stage_json.read_text())
    assert rec1["summary"]["units_done"] == rec2["summary"]["units_done"] == len(CLIPS)  # every unit again
    assert rec2["finished_at"] >= rec1["finished_at"] and rec2 != rec1
    assert second.name.startswith("ingest ") and second.name.endswith("/run (redo)")  # the workdir in the name


def test_the_pipeline_deployment_completes_and_leaves_artifacts(deployed, inputs):
    from prefect import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    run = _run("regdpo-pipeline/pipeline", {**inputs, "max_steps": 2})
    assert run.state.is_completed(), (run.state, _logs(run.id)[-20:])
    report = Path(inputs["workdir"]) / "eval" / "report.md"
    assert report.is_file()
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        assert sorted(r.name.split()[0] for r in children) == sorted(["ingest", "generate", "encode", "train",
                                                                       "evaluate"])
        ids = [r.id for r in children]
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=ids)))}
    generate = next(r for r in children if r.name.startswith("generate "))
    lines = _logs(generate.id)
    assert any(m.startswith("generate: work item 0 done") for m in lines), lines  # the library's own line
    assert any(m.startswith("generate: 1/1 work items") for m in lines)  # the flow's progress line
    assert max(map(len, lines)) < 2000  # no progress-bar redraws glued into one line
    rejects = json.loads(found["regdpo-ingest-rejects"].data)
    assert [r["path"] for r in rejects] == ["missing.mp4"]
    assert found["regdpo-evaluate-report"].data.startswith(report.read_text().splitlines()[0])
    assert "regdpo-train-curves" in found and "regdpo-generate-summary" in found


def test_a_wrong_model_path_fails_before_ingest_without_retry_and_one_traceback_at_most(deployed, inputs):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    params = {**inputs, "overrides": {**inputs["overrides"], "model.preset": None, "model.path": "/no/such/model"}}
    run = _run("regdpo-pipeline/pipeline", params)
    assert run.state.is_failed()
    assert "model.path /no/such/model" in run.state.message
    assert not (Path(inputs["workdir"]) / "ingest").exists()
    with get_client(sync_client=True) as client:
        assert client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))) == []  # no stage started
        states = client.read_flow_run_states(run.id)
    assert not [s for s in states if s.name in ("AwaitingRetry", "Retrying")]
    deadline = time.monotonic() + 30  # a run's last log lines may reach the server after its final state
    logs = _logs(run.id)
    while not any(m.startswith("pipeline failed: ") for m in logs) and time.monotonic() < deadline:
        time.sleep(1)
        logs = _logs(run.id)
    assert sum("Traceback" in m for m in logs) <= 1
    assert any(m.startswith("pipeline failed: model.path /no/such/model") for m in logs), logs


def test_new_pairs_from_nightly_pairs_trigger_nightly_train(deployed, tmp_path):
    """The event a nightly-pairs run emits when encode published pairs starts nightly-train with its config
    and workdir (here for an empty workdir, so the triggered run fails fast: 'run encode first')."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient
    from prefect.settings import PREFECT_API_URL

    from pipelines.flows import PAIRS_EVENT

    nightly, _ = deployed
    api = PREFECT_API_URL.value()  # this module's server
    workdir = str(tmp_path / "empty")
    with get_client(sync_client=True) as client:
        pairs = client.read_deployment_by_name("regdpo-pipeline/nightly-pairs")
    event = Event(event=PAIRS_EVENT, resource={"prefect.resource.id": f"regdpo.workdir.{workdir}"},
                  related=[{"prefect.resource.id": f"prefect.deployment.{pairs.id}",
                            "prefect.resource.role": "deployment", "prefect.resource.name": "nightly-pairs"}],
                  payload={"config_path": str(nightly), "workdir": workdir})

    async def send():  # straight to this module's server (emit_event's worker may be bound to another)
        async with PrefectEventsClient(api_url=api) as events:
            await events.emit(event)

    asyncio.run(send())
    deadline = time.monotonic() + 90
    runs = []
    while not runs and time.monotonic() < deadline:
        time.sleep(2)
        with get_client(sync_client=True) as client:
            runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["nightly-train"]))) if r.parameters.get("workdir") == workdir]
    assert runs, "nightly-train was not triggered by the pairs event"
    assert runs[0].parameters["config_path"] == str(nightly)


def test_work_items_fan_out_to_the_gpu_pool_and_the_stage_publishes_once(deployed, inputs):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    assert _run("regdpo-ingest/ingest", inputs).state.is_completed()
    params = {**inputs, "fan_out": "deployments",
              "overrides": {**inputs["overrides"], "generate.work_item_size": 2}}
    run = _run("regdpo-generate/generate", params)
    assert run.state.is_completed(), (run.state, _logs(run.id)[-20:])
    record = json.loads((Path(inputs["workdir"]) / "negatives" / "stage.json").read_text())
    assert record["summary"]["units_done"] == len(CLIPS)
    with get_client(sync_client=True) as client:
        items = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["work-item"]))) if r.parameters["overrides"]["workdir"] == inputs["workdir"]]
    # 3 clips, 2 per item: each item completed exactly once (a failed attempt, retried, may
    # leave a failed run beside it; never a second completed one)
    assert sorted(r.name for r in items if r.state.is_completed()) == ["generate-0", "generate-1"], \
        [(r.name, r.state.name, r.state.message) for r in items]


def _gpu_worker(api: str) -> int:
    """The pid of the gpu-pool worker of the `regdpo serve` serving `api`."""
    import psutil

    port = api.rsplit(":", 1)[1].split("/")[0]
    serve = next(p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and "serve" in p.info["cmdline"] and port in p.info["cmdline"])
    return next(c.pid for c in serve.children(recursive=True) if "gpu-pool" in c.cmdline())


def _flow_run_pid(flow_run_id) -> int:
    """The pid of a flow run's process (its worker records it once the process started)."""
    from prefect import get_client

    pid: list[int] = []

    def started() -> bool:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
        pid[:] = [int(run.infrastructure_pid.rpartition(":")[2])] if run.infrastructure_pid else []
        return bool(pid)

    wait_for(started, 300, "a flow-run process", poll_s=1)
    return pid[0]


def _ingest_here(inputs: dict) -> None:
    """The ingest stage of `inputs`' workdir, in this process."""
    from regdpo.config import load_config
    from regdpo.stages import run

    run(load_config(ROOT / inputs["config_path"], {**inputs["overrides"], "workdir": inputs["workdir"]}), "ingest")


def _gpu_slots_in_use() -> int:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name("regdpo-gpu").active_slots


def test_a_dead_gpu_worker_comes_back_its_run_crashes_and_the_rerun_keeps_finished_units(server, deployed, inputs):
    """kill -9 of the gpu-pool worker while its generate run has a finished unit and work left (the
    run's process is paused there, so that it cannot finish first on a fast machine): serve says
    so, stops the orphaned run's process, marks it Crashed and restarts the worker; rerunning the
    deployment releases the dead run's GPU slot at once and keeps the finished units."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    api, env, log = server
    _ingest_here(inputs)  # what the generate run reads; its own flow run would cost a process start
    params = {**inputs, "overrides": {**inputs["overrides"], "generate.work_item_size": 1}}
    staging = Path(inputs["workdir"]) / ".staging" / "generate"
    started = run_deployment("regdpo-generate/generate", parameters=params, timeout=0)
    pid = _flow_run_pid(started.id)
    wait_for(lambda: [p for p in staging.glob("*") if p.is_dir() and ".tmp" not in p.name], 600,
             "a generated unit", poll_s=0.1)
    os.kill(pid, signal.SIGSTOP)  # stopped with a unit done, its GPU slot held and work left
    os.kill(_gpu_worker(api), signal.SIGKILL)
    wait_for(lambda: "the gpu-pool worker is running again" in log.read_text(), 300, "the worker's restart",
             log=log, poll_s=1)
    said = log.read_text()
    assert "the gpu-pool worker exited with code -9; its flow runs marked Crashed: generate " in said, said[-3000:]
    wait_for(lambda: not alive(pid), 60, "the end of the orphaned run's process")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(started.id).state.is_crashed()
    kept = len([p for p in staging.glob("*") if p.is_dir() and ".tmp" not in p.name])

    rerun = _run("regdpo-generate/generate", {**params, "force": False})
    lines = _logs(rerun.id)
    assert rerun.state.is_completed(), (rerun.state, lines[-20:])
    assert any(m.startswith("released a slot of regdpo-gpu held by generate ") for m in lines), lines
    assert not [m for m in lines if m.startswith("waiting for")], lines
    assert any(f"{kept} finished earlier" in m for m in lines), lines
    record = json.loads((Path(inputs["workdir"]) / "negatives" / "stage.json").read_text())
    assert record["summary"]["units_done"] == len(CLIPS)  # published: the kept ones and the rest
    assert _gpu_slots_in_use() == 0


def test_kill_9_of_a_run_holding_the_gpu_slot_does_not_block_the_next(server, encoded_workdir, tmp_path):
    """regdpo run against serve's server (its regdpo-gpu limit has one slot): kill -9 during train,
    then the next run releases the dead run's slot at once and resumes from its checkpoint."""
    api, env, log = server
    root = tmp_path / "w"
    shutil.copytree(encoded_workdir, root)
    first, second = root / "first.log", root / "second.log"
    with first.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", "config.yaml", "--stage", "train"], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: checkpoints(root), 600, "a checkpoint", proc, first)
        assert _gpu_slots_in_use() == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = checkpoints(root)[-1]
    with second.open("w") as err:
        proc = subprocess.Popen([str(REGDPO), "run", "config.yaml", "--stage", "train"], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: "train: resuming the interrupted run from" in second.read_text(), 600,
                 "the rerun's training", proc, second)
    finally:
        proc.send_signal(signal.SIGTERM)  # training never ends on its own here
        proc.wait(timeout=300)
    said = second.read_text()
    assert f"train: resuming the interrupted run from {last}" in said, said[-3000:]
    assert "released a slot of regdpo-gpu held by train " in said, said[-3000:]
    assert "waiting for" not in said, said[-3000:]
    assert _gpu_slots_in_use() == 0  # the interrupted rerun released its own


def test_cancelling_a_run_ends_its_work_at_once_without_retries(server, deployed, inputs):
    """A generate run whose work item would take hours, cancelled as a user does from the UI or
    `prefect flow-run cancel`: the running item stops, the queued one never starts, both end
    Cancelled (no retry, no error), the run ends Cancelled, its process exits and its slot is free."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    _ingest_here(inputs)  # what the generate run reads; its own flow run would cost a process start
    params = {**inputs, "overrides": {**inputs["overrides"], "generate.work_item_size": 1,
                                      "generate.num_inference_steps": 1000}}  # minutes per clip
    started = run_deployment("regdpo-generate/generate", parameters=params, timeout=0)
    pid = _flow_run_pid(started.id)

    def task_runs():
        with get_client(sync_client=True) as client:
            return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[started.id])),
                                         task_run_filter=TaskRunFilter(name=TaskRunFilterName(
                                             any_=["generate-0", "generate-1", "generate-2"])))

    def working() -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(started.id).state
        assert not state.is_final(), f"the run ended before it could be cancelled: {state}"
        return any(t.state and t.state.is_running() for t in task_runs()) and _gpu_slots_in_use() == 1

    wait_for(working, 600, "a running work item", poll_s=1)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(started.id, Cancelling(message="cancelled by the test"))
    wait_for(lambda: not alive(pid), 300, "the end of the cancelled run's process", poll_s=0.5)
    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_flow_run(started.id).state.is_final(), 120, "the run's final state", poll_s=1)
        assert client.read_flow_run(started.id).state.is_cancelled()
        runs = task_runs()
        states = {t.name: [s.name for s in client.read_task_run_states(t.id)] for t in runs}
    assert runs and all(t.state.is_cancelled() for t in runs), [(t.name, t.state) for t in runs]
    assert all("stage stopped" in t.state.message for t in runs), [(t.name, t.state.message) for t in runs]
    assert not [n for names in states.values() for n in names if n in ("AwaitingRetry", "Retrying", "Failed")], states
    assert _gpu_slots_in_use() == 0
