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
    report = stage_dir(load_config(config_path).workdir, "evaluate") / "report.html"
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


def _status_lines(config_path, *sets: str) -> dict[str, str]:
    args = ["status", str(config_path)] + [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line for line in result.stdout.splitlines()[1:]}


def test_status_names_what_changed_since_a_stage_ran(config_path, fake_builders):
    cfg = load_config(config_path, {"train.beta": 500})
    for name in ("ingest", "generate", "encode", "train"):
        stages.run(cfg, name)
    assert _status_lines(config_path, "train.beta=500")["train"].split()[1] == "current"
    line = _status_lines(config_path, "train.beta=1000", "train.max_steps=7")["train"]
    assert line.split(None, 2)[1:] == ["stale", "train.beta 500 -> 1000; train.max_steps 1000 -> 7"]

    # encoded again with another setting: train's input changed under it
    stages.run(load_config(config_path, {"encode.latent_dtype": "bfloat16", "train.beta": 500}), "encode")
    lines = _status_lines(config_path, "encode.latent_dtype=bfloat16", "train.beta=500")
    assert lines["train"].split(None, 2)[1:] == ["stale", "inputs: shards changed"]
    assert "encode.latent_dtype bfloat16 -> float32" in _status_lines(config_path, "train.beta=500")["encode"]


def test_status_says_where_an_interrupted_training_run_resumes(config_path, fake_builders):
    import json

    from regdpo.stages.runner import expected_fingerprint

    cfg = load_config(config_path, {"train.max_steps": 5})
    for name in ("ingest", "generate", "encode"):
        stages.run(cfg, name)
    partial = Path(cfg.workdir) / ".train.partial"  # what a run killed after its step-2 checkpoint leaves
    (partial / "checkpoints" / "step-000002").mkdir(parents=True)
    (partial / "checkpoints" / "step-000002" / "state.json").write_text(json.dumps({"format": 1, "step": 2}))
    (partial / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3)))
    (partial / "partial.json").write_text(json.dumps({"fingerprint": expected_fingerprint(cfg, "train")[0]}))
    line = _status_lines(config_path, "train.max_steps=5")["train"]
    assert line.split(None, 2)[1:] == [
        "missing", "an interrupted run resumes from its checkpoint at step 2 of 5 (3 steps logged)"]
    other = _status_lines(config_path, "train.max_steps=5", "train.beta=10")["train"]
    assert "an interrupted run with other settings has its checkpoint at step 2 of 5" in other


def test_ingest_rejects_are_listed_first_few_and_counted(config_path, capsys):
    import pandas as pd

    from regdpo.cli import _echo_rejects

    cfg = load_config(config_path)
    folder = stage_dir(cfg.workdir, "ingest")
    folder.mkdir(parents=True)
    pd.DataFrame({"row": range(1, 13), "path": [f"v{i}.mp4" for i in range(1, 13)],
                  "reason": ["file not found"] * 11 + ["field 'caption': empty or missing"]}).to_parquet(
        folder / "rejects.parquet")
    _echo_rejects(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"  12 inputs rejected (all in {folder / 'rejects.parquet'}):"
    assert lines[1] == "    row 1  v1.mp4: file not found" and len(lines) == 1 + 10 + 1
    assert lines[-1] == "    ... and 2 more"


def test_a_summary_reads_as_rounded_words():
    from regdpo.stages.describe import summary_line

    line = summary_line({"steps": 200, "final_loss": 410.3778076171875, "resumed_from": None, "segment": 0,
                         "reference": "adapters-off", "headline": "fit better, margin unchanged",
                         "verdicts": {"s": "better"}, "units_failed": 1,
                         "failed": [{"id": "a.mp4", "reason": "constant frames"}]})
    assert line == ('steps=200, final_loss=410.4, segment=0, reference=adapters-off, '
                    'headline="fit better, margin unchanged", units_failed=1, first failure: a.mp4: constant frames')
