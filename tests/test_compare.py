"""`regdpo compare`: several runs in one table (markdown + CSV) and one figure."""

import csv
import json

from typer.testing import CliRunner

from regdpo.cli import app
from regdpo.eval.compare import compare_runs, evaluation_state
from tests.test_eval_fixtures import fake_workdir


def test_compare_two_workdirs_writes_table_and_figure(tmp_path):
    dpo = fake_workdir(tmp_path / "dpo", "dpo")
    reg = fake_workdir(tmp_path / "reg-dpo", "reg-dpo", r_scale=0.5)
    written = compare_runs([dpo, reg], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "| dpo | dpo, β 1000, lr 0.001, 60 steps | current | **" in md
    assert "| reg-dpo | reg-dpo, β 1000, r = 0.5·DGR, lr 0.001, 60 steps | current | **" in md
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert len(header.split(" | ")) == 6  # narrow: the detail is in the CSV
    assert "- **dpo**: " in md  # each run's one-sentence verdict
    with written["csv"].open() as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["dpo", "reg-dpo"]
    assert records[0]["denoise_error_real_verdict"] in ("better", "worse", "no measurable change")
    assert records[0]["beta"] == "1000.0" and records[0]["evaluation"] == "current" and records[0]["headline"]
    assert float(records[1]["train_r_end"]) != float(records[0]["train_r_end"])
    assert written["figure"].stat().st_size > 20_000


def test_a_stale_evaluation_is_flagged_everywhere(tmp_path):
    """Trained again after the evaluation: its held-out numbers describe an earlier model."""
    fresh = fake_workdir(tmp_path / "fresh", "dpo")
    retrained = fake_workdir(tmp_path / "retrained", "dpo")
    record = json.loads((retrained / "train" / "stage.json").read_text())
    (retrained / "train" / "stage.json").write_text(json.dumps({**record, "fingerprint": "t2"}))  # e.g. beta changed
    result = CliRunner().invoke(app, ["compare", str(fresh), str(retrained), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"warning: {retrained}: stale evaluation: train/ changed since the evaluation" in result.stderr
    assert str(fresh) not in result.stderr
    md = (tmp_path / "out" / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| retrained |"))
    assert "| stale |" in row and "(stale)**" in row
    assert "> **retrained: stale evaluation.** train/ changed since the evaluation" in md
    with (tmp_path / "out" / "compare.csv").open() as f:
        states = {r["run"]: r["evaluation"] for r in csv.DictReader(f)}
    assert states == {"fresh": "current", "retrained": "stale"}

    # rebuilt later with the same settings (same fingerprint): caught by the finish times
    (retrained / "train" / "stage.json").write_text(json.dumps({**record, "finished_at": "2026-01-02T00:00:00+0000"}))
    assert evaluation_state(retrained)[0] == "stale"
    (retrained / "train" / "stage.json").write_text(json.dumps(record))
    assert evaluation_state(retrained) == ("current", "")


def test_compare_command(tmp_path):
    a = fake_workdir(tmp_path / "a" / "run", "dpo")
    b = fake_workdir(tmp_path / "b" / "run", "sft")
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "a/run" in (tmp_path / "out" / "compare.md").read_text()  # same folder names: parents added
    missing = CliRunner().invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a trained regdpo workdir" in missing.output


def test_compare_two_real_workdirs_dpo_and_reg_dpo(tmp_path):
    """Two workdirs the pipeline made (same data, dpo and reg-dpo): the command writes its
    table and figure, and the table carries each run's held-out verdicts."""
    import shutil

    from regdpo.config import load_config
    from regdpo.stages import run
    from tests.pipeline_helpers import small_config

    fast = {"samples": {"num_inference_steps": 2, "guidance_scale": 1.0}}
    shared = load_config(small_config(tmp_path / "shared", evaluate=fast))
    for stage in ("ingest", "generate", "encode"):
        run(shared, stage)
    workdirs = []
    for objective in ("dpo", "reg-dpo"):
        wd = tmp_path / objective
        shutil.copytree(shared.workdir_path, wd)
        cfg = load_config(small_config(tmp_path / "shared", evaluate=fast, train={"objective": objective}),
                          {"workdir": str(wd)})
        run(cfg, "train")
        run(cfg, "evaluate")
        workdirs.append(wd)
    result = CliRunner().invoke(app, ["compare", *map(str, workdirs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| dpo | dpo, β 1000, lr 0.001, 3 steps | current |" in md
    assert "| reg-dpo | reg-dpo, β 1000, r = DGR, lr 0.001, 3 steps | current |" in md
    assert md.count("**no measurable change**") == 2  # one held-out pair: nothing can be decided
    assert (tmp_path / "out" / "compare.png").stat().st_size > 20_000
    with (tmp_path / "out" / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["train_r_end"]) == 0.0 and float(rows[1]["train_r_end"]) > 0.0
