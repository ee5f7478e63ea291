"""Prefect flows (pipelines.flows) over fake builders.

Tests marked `prefect` share one temporary Prefect server per session (`prefect_harness`); the
rest call `.fn()` and need no server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import flows
from regdpo.config import load_config
from regdpo.stages.runner import STAGES, StageInputError, stage_dir



def _mtimes(workdir: Path, exclude: Path) -> dict[str, int]:
    return {
        str(p): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and exclude not in p.parents
    }


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_runs_all_stages_in_order_then_skips(config_path, fake_builders):
    results = flows.regdpo_pipeline(config_path=str(config_path))
    assert fake_builders == list(STAGES)
    assert [r["stage"] for r in results] == list(STAGES)
    assert set(results[0]) == {"stage", "path", "fingerprint", "skipped", "seconds", "summary"}
    assert not any(r["skipped"] for r in results)
    json.dumps(results)  # small and plain: paths, fingerprints, counts
    workdir = Path(load_config(config_path).workdir)
    for r in results:
        assert Path(r["path"]) == stage_dir(workdir, r["stage"])
        assert (Path(r["path"]) / "stage.json").is_file()

    again = flows.regdpo_pipeline(config_path=str(config_path))
    assert fake_builders == list(STAGES)  # nothing ran twice
    assert all(r["skipped"] for r in again)
    assert [r["fingerprint"] for r in again] == [r["fingerprint"] for r in results]


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_single_stage_rerun_touches_only_that_stage(config_path, fake_builders):
    flows.regdpo_pipeline(config_path=str(config_path))
    workdir = Path(load_config(config_path).workdir)
    eval_dir = stage_dir(workdir, "evaluate")
    before = _mtimes(workdir, exclude=eval_dir)
    fake_builders.clear()

    results = flows.regdpo_pipeline(
        config_path=str(config_path), stages=["evaluate"], overrides={"evaluate.seed": 7}
    )
    assert fake_builders == ["evaluate"]
    assert [(r["stage"], r["skipped"]) for r in results] == [("evaluate", False)]
    assert _mtimes(workdir, exclude=eval_dir) == before
    assert (eval_dir / "report.md").is_file()

    from prefect import get_client

    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_flow_runs()}
    assert {"pipeline-evaluate-config", "evaluate-config"} <= names


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_missing_input_surfaces_as_stage_input_error(config_path, fake_builders):
    with pytest.raises(StageInputError, match="run ingest first"):
        flows.regdpo_pipeline(config_path=str(config_path), stages=["generate"])
    # the stage flow alone (as its own deployment would run it) fails the same way, in the runner
    with pytest.raises(StageInputError, match="run ingest first"):
        flows.generate_flow(config_path=str(config_path))
    assert fake_builders == []


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_generate_retries_transient_errors_only(config_path, fake_builders, monkeypatch):
    import regdpo.stages

    monkeypatch.setattr(flows, "RETRY_DELAY_S", 0)
    flows.ingest_flow(config_path=str(config_path))
    fake = regdpo.stages.get_builder
    attempts: list[str] = []

    def flaky(name):
        def build(ctx):
            attempts.append(name)
            if len(attempts) == 1:
                raise OSError("NFS hiccup")
            return fake(name)(ctx)

        return build

    monkeypatch.setattr(regdpo.stages, "get_builder", flaky)
    out = flows.generate_flow(config_path=str(config_path))
    assert attempts == ["generate", "generate"] and not out["skipped"]

    def bad_value(name):
        def build(ctx):
            attempts.append(name)
            raise ValueError("a clip has no caption")

        return build

    attempts.clear()
    monkeypatch.setattr(regdpo.stages, "get_builder", bad_value)
    with pytest.raises(ValueError, match="no caption"):
        flows.generate_flow(config_path=str(config_path), force=True)
    assert attempts == ["generate"]  # a user-input error is not retried


# --- plain logic through .fn(): no server ---------------------------------------------------


def test_stage_task_fn_returns_small_dict(config_path, fake_builders):
    cfg = load_config(config_path)
    out = flows.run_stage_task.fn(cfg, "ingest")
    assert out["stage"] == "ingest" and out["skipped"] is False and out["summary"] == {"num_items": 3}
    assert flows.run_stage_task.fn(cfg, "ingest")["skipped"] is True
    assert flows.run_stage_task.fn(cfg, "ingest", force=True)["skipped"] is False
    assert fake_builders == ["ingest", "ingest"]


def test_retry_condition():
    from prefect.states import Failed

    assert flows._retry_transient(None, None, Failed(data=OSError("CUDA out of memory")))
    assert not flows._retry_transient(None, None, Failed(data=StageInputError("run ingest first")))
    assert not flows._retry_transient(None, None, Failed(data=ValueError("bad clip")))


def test_every_stage_has_a_flow_with_the_same_parameters():
    assert list(flows.STAGE_FLOWS) == list(STAGES)
    for name, fl in flows.STAGE_FLOWS.items():
        assert fl.name == f"regdpo-{name}"
        assert set(fl.parameters.properties) == {"config_path", "force", "overrides"}
    assert set(flows.regdpo_pipeline.parameters.properties) == {"config_path", "stages", "force", "overrides"}
