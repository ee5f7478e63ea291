"""Failure accounting of unit stages (regdpo/stages/accounting.py): a stage whose units mostly
fail is not published and says why on one line; a few failures publish the rest, visibly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from regdpo.cli import app
from regdpo.config import load_config
from regdpo.stages.accounting import UnitsFailed, check_failures, failures_line, reason_counts
from regdpo.stages.runner import read_stage_record, run_stage, stage_state
from regdpo.stages.units import Staging
from tests.fakes import FakeUnits

MISMATCH = RuntimeError("expected input with 36 channels, got 16 (model.family?)\n  at the first conv")


def _config(config_path: Path, rows: int, **overrides):
    names = [chr(ord("a") + i) for i in range(rows)]
    (config_path.parent / "manifest.csv").write_text("path,caption\n" + "".join(f"{n}.mp4,a {n}\n" for n in names))
    return load_config(config_path, overrides or None)


def test_every_unit_failed_fails_with_one_counted_line_and_publishes_nothing(config_path, caplog):
    cfg = _config(config_path, 10)
    with pytest.raises(UnitsFailed) as failed:
        run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("*",), fail_with=MISMATCH))
    message = str(failed.value)
    assert message.startswith("10 of 10 units failed: 10 x RuntimeError: expected input with 36 channels, got 16 "
                              "(model.family?) (every unit failed; nothing published")
    assert "\n" not in message and not failed.value.transient
    assert read_stage_record(cfg.workdir, "ingest") is None  # not marked current
    state, why = stage_state(cfg, "ingest", FakeUnits("ingest"))
    assert state == "missing" and why.startswith("10 failed in the last run: 10 x RuntimeError: expected input")
    # the log has one line per unit, no traceback; the traceback is in the unit's failure note
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest: unit ")]
    assert len(lines) == 10 and not any(r.exc_info for r in caplog.records) and all("\n" not in m for m in lines)
    note = next(iter(Staging(Path(cfg.workdir), "ingest").failures().values()))
    assert "Traceback" in note["details"] and note["transient"] is False


def test_max_failed_fraction_is_the_bound_and_all_failed_always_counts(config_path):
    cfg = _config(config_path, 10, **{"ingest.max_failed_fraction": 0.2})
    with pytest.raises(UnitsFailed, match=r"^3 of 10 units failed: 1 x RuntimeError: cannot do a_mp4; 1 x .*c_mp4 "
                                          r"\(more than ingest.max_failed_fraction = 0.2 of the units; nothing"):
        run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("a_mp4", "b_mp4", "c_mp4")))
    assert read_stage_record(cfg.workdir, "ingest") is None
    two = run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("a_mp4", "b_mp4")))  # 0.2: at the bound
    assert two.summary["units_failed"] == 2 and two.summary["num_items"] == 8
    # with every failure allowed, a stage whose units all fail still fails
    with pytest.raises(UnitsFailed, match="every unit failed"):
        check_failures("generate", 4, [{"reason": "x"}] * 4, 1.0, where="staging")
    check_failures("generate", 4, [{"reason": "x"}] * 3, 1.0, where="staging")


def test_one_failed_unit_of_ten_publishes_nine_and_shows_it(config_path, caplog, fake_builders):
    cfg = _config(config_path, 10)
    with caplog.at_level(logging.INFO):
        result = run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("j_mp4",), size=4))
    summary = read_stage_record(cfg.workdir, "ingest")["summary"]
    assert summary == result.summary
    from pipelines.artifacts import summary_markdown  # what the run's Prefect artifact shows

    artifact = summary_markdown({"stage": "ingest", "skipped": False, "seconds": result.seconds, "path": str(result.path),
                                 "fingerprint": result.fingerprint, "summary": result.summary}, cfg.workdir)
    assert "| units_failed | 1 |" in artifact and '"RuntimeError: cannot do j_mp4": 1' in artifact
    assert (summary["num_items"], summary["units_done"], summary["units_failed"]) == (9, 9, 1)
    assert summary["failure_reasons"] == {"RuntimeError: cannot do j_mp4": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert "ingest: 1 of 10 units failed: 1 x RuntimeError: cannot do j_mp4; published the other 9" in messages
    warning = next(r for r in caplog.records if "published the other" in r.getMessage())
    assert warning.levelno == logging.WARNING
    # one progress line per work item, counting done, reused and failed units
    assert [m for m in messages if "work items;" in m] == [
        "ingest: 1/3 work items; 10 units: 4 done, 0 reused, 0 failed, 6 to do",
        "ingest: 2/3 work items; 10 units: 8 done, 0 reused, 0 failed, 2 to do",
        "ingest: 3/3 work items; 10 units: 9 done, 0 reused, 1 failed, 0 to do"]

    out = CliRunner().invoke(app, ["status", str(config_path)])
    assert out.exit_code == 0, out.output
    ingest = next(line for line in out.stdout.splitlines() if line.startswith("ingest"))
    assert ingest.split()[1] == "stale"
    assert ingest.endswith("1 of 10 units to do; 1 failed in the last run: 1 x RuntimeError: cannot do j_mp4")

    again = run_stage(cfg, "ingest", FakeUnits("ingest"))  # the next run retries it
    assert (again.summary["units_done"], again.summary["units_reused"], again.summary["units_failed"]) == (1, 9, 0)
    assert "failure_reasons" not in again.summary


def test_reasons_are_grouped_by_first_line_most_frequent_first():
    failures = [{"reason": "A: x\nmore"}, {"reason": "B: y"}, {"reason": "A: x\nother"}, {"reason": "C"},
                {"reason": "D"}, {"reason": "D"}, {"reason": "E"}]
    counts = reason_counts(failures)
    assert counts == {"A: x": 2, "D": 2, "B: y": 1, "C": 1, "E": 1}
    assert failures_line(7, 9, counts) == "7 of 9 units failed: 2 x A: x; 2 x D; 1 x B: y; 2 more with 2 other reasons"
    assert len(reason_counts([{"reason": "x" * 1000}]).popitem()[0]) == 200


def test_failures_that_all_pass_on_their_own_make_a_transient_stage_error(config_path):
    import torch

    cfg = _config(config_path, 2)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(UnitsFailed) as failed:
        run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("*",), fail_with=oom))
    assert failed.value.transient


@pytest.mark.prefect
@pytest.mark.usefixtures("prefect_harness")
def test_a_run_whose_generate_units_all_fail_ends_on_one_line_and_generate_is_not_current(config_path,
                                                                                          fake_builders, monkeypatch):
    import regdpo.stages

    real_get_impl = regdpo.stages.get_impl
    broken = FakeUnits("generate", fail_ids=("*",), fail_with=MISMATCH)
    monkeypatch.setattr(regdpo.stages, "get_impl", lambda name: broken if name == "generate" else real_get_impl(name))
    _config(config_path, 10)
    result = CliRunner().invoke(app, ["run", str(config_path)])
    assert result.exit_code == 1
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: generate failed: 10 of 10 units failed: 10 x RuntimeError: expected input with "
                           "36 channels, got 16 (model.family?) (every unit failed; nothing published"), last
    assert "Traceback" not in result.output
    cfg = load_config(config_path)
    assert read_stage_record(cfg.workdir, "generate") is None
    assert stage_state(cfg, "generate")[0] == "missing" and stage_state(cfg, "ingest")[0] == "current"
    assert fake_builders == ["ingest"]  # nothing after generate ran
