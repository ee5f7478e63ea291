"""Prefect flows (pipelines.flows) over fake stages (tests/fakes.py).

Tests marked `prefect` share one temporary Prefect server per session (`prefect_harness`); the
rest need no server. The real-server, real-worker path is in test_deploy_server.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines import artifacts, flows
from regdpo.config import load_config
from regdpo.stages.registry import STAGE
from regdpo.stages.runner import STAGES, StageInputError, stage_dir


@pytest.fixture
def cfg_path(config_path: Path) -> Path:
    """The tiny config with a three-row manifest (the fake ingest has one unit per row)."""
    (config_path.parent / "manifest.csv").write_text("path,caption\na.mp4,one\nb.mp4,two\nc.mp4,three\n")
    return config_path


def _mtimes(workdir: Path, exclude: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and exclude not in p.parents and ".regdpo.lock" not in p.name}


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and r.exc_info[0] is not None]


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_runs_all_stages_in_order_then_skips(cfg_path, fake_builders):
    results = flows.regdpo_pipeline(config_path=str(cfg_path))
    assert fake_builders == list(STAGES)
    assert [r["stage"] for r in results] == list(STAGES)
    assert set(results[0]) == {"stage", "path", "fingerprint", "skipped", "seconds", "summary"}
    assert not any(r["skipped"] for r in results)
    json.dumps(results)  # small and plain: paths, fingerprints, counts
    workdir = Path(load_config(cfg_path).workdir)
    for r in results:
        assert Path(r["path"]) == stage_dir(workdir, r["stage"])
        assert (Path(r["path"]) / "stage.json").is_file()

    again = flows.regdpo_pipeline(config_path=str(cfg_path))
    assert fake_builders == list(STAGES)  # nothing ran twice
    assert all(r["skipped"] for r in again)


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_single_stage_rerun_touches_only_that_stage_and_names_show_the_workdir(cfg_path, fake_builders):
    flows.regdpo_pipeline(config_path=str(cfg_path))
    workdir = Path(load_config(cfg_path).workdir)
    eval_dir = stage_dir(workdir, "evaluate")
    before = _mtimes(workdir, exclude=eval_dir)
    fake_builders.clear()

    results = flows.regdpo_pipeline(config_path=str(cfg_path), stages=["evaluate"], force=True,
                                    overrides={"evaluate.seed": 7})
    assert fake_builders == ["evaluate"]
    assert [(r["stage"], r["skipped"]) for r in results] == [("evaluate", False)]
    assert _mtimes(workdir, exclude=eval_dir) == before
    assert (eval_dir / "report.md").is_file()

    from prefect import get_client

    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_flow_runs()}
    label = f"{workdir.parent.name}/{workdir.name}"
    assert {f"pipeline evaluate {label} (redo)", f"evaluate {label} (redo)"} <= names


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_a_stage_flow_redoes_its_stage_unless_told_not_to(cfg_path, fake_builders):
    """A stage deployment run means `regdpo run --stage`: the stage runs even when current."""
    first = flows.ingest_flow(config_path=str(cfg_path))
    second = flows.ingest_flow(config_path=str(cfg_path))
    assert not first["skipped"] and not second["skipped"]
    assert fake_builders == ["ingest", "ingest"]
    assert flows.ingest_flow(config_path=str(cfg_path), force=False)["skipped"]
    assert fake_builders == ["ingest", "ingest"]


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_typed_parameters_reach_the_config(cfg_path, fake_builders, tmp_path):
    flows.regdpo_pipeline(config_path=str(cfg_path), stages=["ingest", "generate", "encode"])
    other = tmp_path / "elsewhere"
    out = flows.train_flow(config_path=str(cfg_path), max_steps=7, beta=250.0, objective="dpo",
                           overrides={"train.max_steps": 3, "workdir": str(other)}, workdir=str(cfg_path.parent / "run"))
    resolved = load_config(Path(out["path"]) / "config.yaml")  # written by the runner beside the outputs
    assert (resolved.train.max_steps, resolved.train.beta, resolved.train.objective) == (7, 250.0, "dpo")
    assert not other.exists()  # the typed workdir wins over the same key in overrides


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_missing_input_fails_before_anything_runs(cfg_path, fake_builders):
    with pytest.raises(StageInputError, match="run ingest first"):
        flows.regdpo_pipeline(config_path=str(cfg_path), stages=["generate"])
    # the stage flow alone (as its own deployment would run it) fails the same way
    with pytest.raises(StageInputError, match="run ingest first"):
        flows.generate_flow(config_path=str(cfg_path))
    assert fake_builders == []


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_wrong_model_path_fails_before_ingest_once_without_traceback(cfg_path, fake_builders, caplog):
    state = flows.regdpo_pipeline(config_path=str(cfg_path), overrides={"model.preset": None, "model.path": "/no/model"},
                                  return_state=True)
    assert state.is_failed() and "model.path /no/model" in state.message
    assert fake_builders == []  # ingest never ran
    assert not stage_dir(load_config(cfg_path).workdir, "ingest").exists()
    assert _tracebacks(caplog) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [state.message]  # one line, logged once


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_transient_errors_retry_once_permanent_ones_never_and_one_traceback_at_most(cfg_path, fake_builders,
                                                                                     monkeypatch, caplog):
    import errno

    import torch

    import regdpo.stages
    from regdpo.config import ConfigError
    from tests.fakes import fake_build

    monkeypatch.setattr(flows, "RETRY_DELAY_S", 0)
    flows.regdpo_pipeline(config_path=str(cfg_path), stages=["ingest", "generate", "encode"])
    real_get_impl = regdpo.stages.get_impl
    attempts: list[str] = []

    def with_train(build):
        monkeypatch.setattr(regdpo.stages, "get_impl", lambda name: build if name == "train" else real_get_impl(name))

    def failing_once(error):
        def build(ctx):
            attempts.append("train")
            if len(attempts) == 1:
                raise error
            return fake_build("train", [])(ctx)
        return build

    # errors that can pass on their own: retried once, and the retry succeeds
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  OSError(errno.ESTALE, "Stale file handle")):
        attempts.clear()
        with_train(failing_once(error))
        out = flows.train_flow(config_path=str(cfg_path))
        assert attempts == ["train", "train"] and not out["skipped"], error

    # configuration, model and data errors: never retried
    for error in (ValueError("a clip has no caption"), ConfigError("train.beta must be > 0"),
                  NotImplementedError("image-to-video for this family"),
                  FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/wan/transformer")):
        attempts.clear()
        caplog.clear()
        with_train(failing_once(error))
        state = flows.regdpo_pipeline(config_path=str(cfg_path), stages=["train"], force=True, return_state=True)
        assert attempts == ["train"], error
        assert state.is_failed() and state.message.startswith("train failed: ")
        assert type(state.result(raise_on_failure=False)) is type(error)
        assert state.message in [r.getMessage() for r in caplog.records]
        # a user error is its one line; anything else also leaves one traceback on the run's log
        assert len(_tracebacks(caplog)) == (0 if isinstance(error, ValueError) else 1), error

    def bug(ctx):
        attempts.append("train")
        raise RuntimeError("index out of range")

    attempts.clear()
    caplog.clear()
    with_train(bug)
    with pytest.raises(RuntimeError, match="index out of range"):
        flows.regdpo_pipeline(config_path=str(cfg_path), stages=["train"], force=True)
    assert attempts == ["train"]  # a bug is not retried either
    assert len(_tracebacks(caplog)) == 1


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_leaves_artifacts(cfg_path, fake_builders):
    import pandas as pd
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName

    flows.regdpo_pipeline(config_path=str(cfg_path))
    workdir = Path(load_config(cfg_path).workdir)
    # a rejects table and training metrics as the real stages write them, then a rerun shows them
    pd.DataFrame({"row": [3], "path": ["c.mp4"], "reason": ["too short: 0.4 s"]}).to_parquet(
        stage_dir(workdir, "ingest") / "rejects.parquet")
    (stage_dir(workdir, "train") / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 0.7 - i / 100, "s": -i / 1000}) + "\n" for i in range(60)) + '{"step": 6')
    flows.regdpo_pipeline(config_path=str(cfg_path))

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=f"ingest {workdir.parent.name}/run")))[0]
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[artifacts.key("ingest", "rejects"), artifacts.key("train", "curves"),
                  artifacts.key("evaluate", "report"), artifacts.key("ingest", "summary")])))}
    assert set(found) == {"regdpo-ingest-rejects", "regdpo-train-curves", "regdpo-evaluate-report",
                          "regdpo-ingest-summary"}
    assert found["regdpo-ingest-rejects"].type == "table"
    rows = json.loads(found["regdpo-ingest-rejects"].data)
    assert rows == [{"row": "3", "path": "c.mp4", "reason": "too short: 0.4 s"}]
    assert found["regdpo-evaluate-report"].data.startswith("# report")
    curves = found["regdpo-train-curves"].data
    assert "| 0 | 0.7 | 0 |" in curves and "| 59 | 0.11 | -0.059 |" in curves  # first and last step, torn line dropped
    assert run.state.is_completed()


def _fork_exitcode() -> int:
    import multiprocessing as mp

    child = mp.get_context("fork").Process(target=print, args=("child",))
    child.start()
    child.join()
    return child.exitcode


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_fork_in_a_flow_run_exits_cleanly():
    """Without pipelines/forksafe.py, a forked child (a torch DataLoader worker) exits with code 1."""
    from prefect import flow, task

    @flow
    def forks() -> int:
        return task(_fork_exitcode)()

    assert forks() == 0


# --- plain logic: no server ---------------------------------------------------------------


def test_retry_condition():
    import errno

    import torch
    from prefect.states import Failed

    from regdpo.stages import WorkdirLocked

    assert flows._retry_transient(None, None, Failed(data=torch.OutOfMemoryError("CUDA out of memory")))
    assert flows._retry_transient(None, None, Failed(data=OSError(errno.ESTALE, "Stale file handle")))
    assert not flows._retry_transient(None, None, Failed(data=StageInputError("run ingest first")))
    assert not flows._retry_transient(None, None, Failed(data=ValueError("bad clip")))
    assert not flows._retry_transient(None, None, Failed(data=WorkdirLocked("held by pid 1")))
    assert not flows._retry_transient(None, None, Failed(data=NotImplementedError("i2v")))


def test_stage_flows_come_from_the_registry_with_described_parameters():
    assert list(flows.STAGE_FLOWS) == list(STAGES)
    for name, fl in flows.STAGE_FLOWS.items():
        stage = STAGE[name]
        assert fl.name == f"regdpo-{name}" and getattr(flows, f"{name}_flow") is fl
        props = fl.parameters.properties
        expected = {"config_path", "force", "workdir", "overrides"}
        expected |= {"max_steps", "beta", "objective"} if "train" in stage.sections else set()
        expected |= {"fan_out"} if stage.units else set()
        assert set(props) == expected, name
        assert props["force"]["default"] is True  # a stage deployment run redoes its stage
        assert all(p.get("description") for p in props.values()), name
    pipe = flows.regdpo_pipeline.parameters.properties
    assert set(pipe) == {"config_path", "stages", "force", "workdir", "max_steps", "beta", "objective", "fan_out",
                         "overrides"}
    assert all(p.get("description") for p in pipe.values())
    assert pipe["stages"]["anyOf"][0]["items"]["enum"] == list(STAGES)  # an enum in the UI form
    assert pipe["objective"]["anyOf"][0]["enum"] == ["reg-dpo", "dpo", "sft"]
    assert pipe["beta"]["anyOf"][0]["exclusiveMinimum"] == 0  # TrainConfig's bound, not a copy
    assert pipe["force"]["default"] is False


def test_artifact_markdown_helpers(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    report = tmp_path / "report.md"
    report.write_text("# r\n![curves](a.png) [site](https://x.org) [sub](samples/s.mp4)\n")
    text = artifacts.report_markdown(report)
    assert f"[curves]({(tmp_path / 'a.png').as_uri()})" in text
    assert "[site](https://x.org)" in text and (tmp_path / "samples" / "s.mp4").as_uri() in text
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(100)))
    table = [ln for ln in artifacts.curves_markdown(metrics).splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(table) <= artifacts.CURVE_POINTS + 1 and table[0].startswith("| 0 ") and table[-1].startswith("| 99 ")
