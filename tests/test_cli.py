"""The `regdpo` command (typer CliRunner). Only the `run` success test needs the Prefect harness."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from regdpo import stages
from regdpo.cli import app
from regdpo.config import load_config
from regdpo.stages.runner import STAGES, stage_dir

runner = CliRunner()


def test_bad_config_exits_2_naming_the_field(config_path):
    config_path.write_text(config_path.read_text() + "train: {betta: 100}\n")
    result = runner.invoke(app, ["run", str(config_path)])
    assert result.exit_code == 2
    assert "train.betta" in result.stderr and "unknown key" in result.stderr
    assert "Traceback" not in result.output


def test_bad_override_exits_2(config_path):
    result = runner.invoke(app, ["run", str(config_path), "--set", "train.beta=-1"])
    assert result.exit_code == 2 and "train.beta" in result.stderr
    result = runner.invoke(app, ["status", str(config_path.parent / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.stderr
    result = runner.invoke(app, ["run", str(config_path), "--set", "train.max_steps"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_unknown_stage_exits_2(config_path):
    result = runner.invoke(app, ["run", str(config_path), "--stage", "finetune"])
    assert result.exit_code == 2 and "unknown stage" in result.stderr


def test_run_single_stage_without_inputs_says_what_to_run(config_path, fake_builders):
    result = runner.invoke(app, ["run", str(config_path), "--stage", "generate"])
    assert result.exit_code == 2
    assert "run ingest first" in result.stderr
    assert "Traceback" not in result.output
    assert fake_builders == []


def test_status(config_path, fake_builders):
    (config_path.parent / "manifest.csv").write_text("path,caption\na.mp4,a cat\n")
    result = runner.invoke(app, ["status", str(config_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("workdir: ")
    assert [line.split()[:2] for line in lines[1:]] == [[s, "missing"] for s in STAGES]

    cfg = load_config(config_path)
    stages.run(cfg, "ingest")
    stages.run(cfg, "generate")
    states = _states(runner.invoke(app, ["status", str(config_path)]).stdout)
    assert states == {"ingest": "current", "generate": "current", "encode": "missing", "train": "missing", "evaluate": "missing"}

    # a changed ingest setting makes ingest stale, and generate with it (its input changed)
    states = _states(runner.invoke(app, ["status", str(config_path), "--set", "ingest.min_side=32"]).stdout)
    assert states["ingest"] == "stale" and states["generate"] == "stale"
    # a changed generate setting leaves ingest current
    states = _states(runner.invoke(app, ["status", str(config_path), "--set", "generate.seed=3"]).stdout)
    assert states["ingest"] == "current" and states["generate"] == "stale"


def _states(output: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in output.splitlines()[1:]}


def test_stages_lists_names():
    result = runner.invoke(app, ["stages"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(STAGES)


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_run_through_prefect_prints_stages_and_report(config_path, fake_builders):
    result = runner.invoke(app, ["run", str(config_path), "--set", "train.max_steps=5"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.split()[0] in STAGES]
    assert [line.split()[:2] for line in lines] == [[s, "ran"] for s in STAGES]
    assert "num_items=2" in lines[0]
    report = stage_dir(load_config(config_path).workdir, "evaluate") / "report.md"
    assert f"report: {report}" in result.stdout
    assert fake_builders == list(STAGES)

    # the whole DAG again with the same settings: everything current, nothing runs
    same = runner.invoke(app, ["run", str(config_path), "--set", "train.max_steps=5"])
    assert same.exit_code == 0, same.output
    assert [line.split()[:2] for line in same.stdout.splitlines() if line.split()[0] in STAGES] == [
        [s, "skipped"] for s in STAGES
    ]
    assert fake_builders == list(STAGES)

    # naming stages reruns exactly those, even though they are current
    again = runner.invoke(app, ["run", str(config_path), "--set", "train.max_steps=5", "--stage", "train", "-s", "evaluate"])
    assert again.exit_code == 0, again.output
    assert [line.split()[:2] for line in again.stdout.splitlines() if line.split()[0] in STAGES] == [
        ["train", "ran"],
        ["evaluate", "ran"],
    ]
    assert fake_builders == list(STAGES) + ["train", "evaluate"]
    assert f"report: {report}" in again.stdout
    assert Path(report).is_file()


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_stage_input_problem_is_a_message_not_a_traceback(config_path, monkeypatch):
    def build(ctx):
        raise ValueError("manifest.csv: no clip was accepted; fix or replace these inputs")

    monkeypatch.setattr(stages, "get_impl", lambda name: build)
    result = runner.invoke(app, ["run", str(config_path), "--stage", "ingest"])
    assert result.exit_code == 1
    # the command ends on one line naming the stage and the reason; no traceback anywhere
    assert result.stderr.rstrip().endswith("error: ingest failed: manifest.csv: no clip was accepted; fix or replace these inputs")
    assert isinstance(result.exception, SystemExit)


def test_deploy_without_a_server_says_how_to_get_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even inside the session's test harness
        result = runner.invoke(app, ["deploy"])
    assert result.exit_code == 2
    assert "set PREFECT_API_URL" in result.stderr and "regdpo serve" in result.stderr
    assert "Traceback" not in result.output


def test_serve_beyond_loopback_needs_auth(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "PREFECT_SERVER_API_AUTH_STRING" in result.stderr
