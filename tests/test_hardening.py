"""Faults, hostile inputs and config mistakes: each "Why" bullet of the hardening work,
reproduced, and what happens now.

| Why bullet                                   | test (file::name)                                                          |
|----------------------------------------------|----------------------------------------------------------------------------|
| kill inside the publish window               | test_runner.py::test_kill_inside_the_swap_never_loses_the_finished_output,  |
|                                              | test_runner.py::test_kill_after_commit_is_completed_by_the_next_run,        |
|                                              | test_runner.py::test_kill_before_commit_leaves_the_old_output_and_no_temporaries |
| torn line in train/metrics.jsonl             | test_hardening.py::test_a_torn_last_metrics_line_no_longer_blocks_resume,   |
|                                              | test_hardening.py::test_a_damaged_line_before_the_last_is_an_error_naming_it, |
|                                              | test_hardening.py::test_every_metrics_reader_drops_the_torn_last_line,      |
|                                              | test_hardening.py::test_a_kill_inside_the_truncation_keeps_the_old_log      |
| `.inf` guidance (black negatives published)  | test_hardening.py::test_inf_and_out_of_range_guidance_fail_before_any_stage, |
|                                              | test_config.py::test_every_float_field_rejects_inf_and_nan_naming_it,       |
|                                              | test_pairs_at_scale.py::test_unusable_generations_fail_their_unit          |
| NaN held-out latents / NaN train/final       | test_hardening.py::test_nan_heldout_latents_are_refused_naming_the_sample,  |
|                                              | test_hardening.py::test_nan_weights_in_train_final_are_refused              |
| `train.learning_rate: 1e3` diverged LoRA     | test_hardening.py::test_lr_1e3_fails_naming_the_learning_rate_and_publishes_nothing, |
|                                              | test_hardening.py::test_divergence_names_the_step_and_keeps_no_diverged_checkpoint |
| 19 of 65 bad config values accepted          | test_config.py::test_every_bounded_numeric_field_rejects_a_value_past_its_bound, |
|                                              | test_runner.py::test_evaluate_without_a_heldout_split_fails_before_anything_runs |
| shard key `../../x` written outside workdir  | test_hardening.py::test_a_crafted_shard_key_fails_naming_shard_and_key,     |
|                                              | test_shards.py::test_pair_ids_are_checked_before_use_as_a_name             |
| symlink out of the manifest folder           | test_ingest.py::test_hostile_rows_get_reasons_that_say_what_is_wrong |
| replaced source video / edited shard         | test_pairs_at_scale.py::test_replaced_source_and_edited_shard_make_their_dependents_stale, |
|                                              | test_runner.py::test_replaced_model_weights_redo_model_stages              |
| ~165-line errors                             | test_server_lifetime.py::test_a_failing_run_prints_one_line_and_no_traceback, |
|                                              | test_cli.py::test_stage_input_problem_is_a_message_not_a_traceback,         |
|                                              | test_flows.py::test_transient_errors_retry_once_user_errors_never_and_one_traceback_at_most |
| orphaned temporary Prefect server            | test_server_lifetime.py::test_kill_9_of_regdpo_run_stops_its_temporary_server |

Run: .venv/bin/python -m pytest -q tests/test_hardening.py
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from regdpo.models import load_model
from regdpo.train.loop import train
from regdpo.train.observe import read_jsonl, read_metrics, truncate_metrics
from tests.test_train_fixtures import read_rows, synthetic_pairs, train_config, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("hardening") / "shards", synthetic_pairs(4), 4)


def _urls(root: Path) -> list[str]:
    return [str(p) for p in sorted((root / "train").glob("*.tar"))]


# ---- torn metrics line ---------------------------------------------------------------------


def test_a_torn_last_metrics_line_no_longer_blocks_resume(shards, tmp_path, caplog):
    """A full disk cut the last line short: resume drops it (a warning names file and line)."""
    cfg = train_config(tmp_path, max_steps=2, checkpoint_every=2)
    out = tmp_path / "out"
    train(cfg, load_model(cfg.model), _urls(shards), out)
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 2, "loss": 0.69 "dpo')  # the "Expecting ',' delimiter"
    more = train_config(tmp_path, max_steps=3, checkpoint_every=2)
    with caplog.at_level(logging.WARNING, logger="regdpo.train"):
        summary = train(more, load_model(more.model), _urls(shards), out)
    assert summary["resumed_from"] == "step-000002" and summary["steps"] == 3
    assert [r["step"] for r in read_rows(metrics)] == [0, 1, 2]
    assert any(str(metrics) in r.getMessage() and "torn last line 3" in r.getMessage() for r in caplog.records)


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{metrics}: line 2 is not a JSON object.*train.resume: fresh"):
        read_metrics(metrics)
    metrics.write_text('{"step": 0}\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{metrics}: line 2 has no integer \"step\""):
        read_metrics(metrics)


def test_every_metrics_reader_drops_the_torn_last_line(tmp_path, caplog):
    """The trainer, the progress relay of a torchrun launch and the report's reader share one rule."""
    from regdpo.eval.plots import load_metrics
    from regdpo.train.launch import _relay_progress

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(4)) + '{"step": 4, "lo')
    with caplog.at_level(logging.INFO, logger="regdpo.train"):
        assert [r["step"] for r in read_metrics(metrics)] == [0, 1, 2, 3]
        assert _relay_progress(metrics, 0, 2) == 4  # rows relayed; the line being written waits
    relayed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert relayed == ["step 2 loss 0.5 dgr None win_gap None lose_gap None",
                       "step 4 loss 0.5 dgr None win_gap None lose_gap None"]
    rows, unread = load_metrics(metrics)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and unread == 1
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_a_kill_inside_the_truncation_keeps_the_old_log(tmp_path, monkeypatch):
    """The rewrite on resume goes to a temporary file that replaces the log in one step."""
    metrics = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(5))
    metrics.write_text(text)

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            truncate_metrics(metrics, 2)
    assert metrics.read_text() == text
    truncate_metrics(metrics, 2)
    assert [r["step"] for r in read_rows(metrics)] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
