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
|                                              | test_config.py::test_every_float_field_rejects_inf_and_nan_naming_it       |
| NaN held-out latents / NaN train/final       | test_hardening.py::test_nan_heldout_latents_are_refused_naming_the_sample,  |
|                                              | test_hardening.py::test_nan_weights_in_train_final_are_refused,             |
|                                              | test_hardening.py::test_non_finite_held_out_errors_name_the_pair_and_shard  |
| `train.learning_rate: 1e3` diverged LoRA     | test_hardening.py::test_inf_and_out_of_range_guidance_fail_before_any_stage, |
|                                              | test_hardening.py::test_lr_1e3_fails_naming_the_learning_rate_and_publishes_nothing, |
|                                              | test_hardening.py::test_divergence_names_the_step_and_keeps_the_published_run, |
|                                              | test_hardening.py::test_a_loss_beyond_the_bound_blames_data_or_learning_rate |
| 19 of 65 bad config values accepted          | test_config.py::test_every_numeric_field_has_a_range_and_rejects_values_past_it, |
|                                              | test_config.py::test_the_ranges_the_issue_found_missing,                   |
|                                              | test_runner.py::test_evaluate_without_a_heldout_split_fails_before_anything_runs |
| shard key `../../x` written outside workdir  | test_hardening.py::test_a_crafted_shard_key_fails_naming_shard_and_key,     |
|                                              | test_shards.py::test_pair_ids_are_checked_before_use_as_a_name             |
| symlink out of the manifest folder           | test_ingest.py::test_hostile_rows_get_reasons_that_say_what_is_wrong       |
| replaced source video / edited shard         | test_pairs_at_scale.py::test_replaced_source_and_edited_shard_make_their_dependents_stale, |
|                                              | test_runner.py::test_replaced_model_weights_redo_model_stages              |
| ~165-line errors                             | test_server_lifetime.py::test_a_failing_run_prints_one_line_and_no_traceback, |
|                                              | test_cli.py::test_stage_input_problem_is_a_message_not_a_traceback,         |
|                                              | test_flows.py::test_transient_errors_retry_once_permanent_ones_never_and_one_traceback_at_most |
| orphaned temporary Prefect server            | test_server_lifetime.py::test_kill_9_of_regdpo_run_stops_its_temporary_server |

Run: .venv/bin/python -m pytest -q tests/test_hardening.py
"""

from __future__ import annotations

import json
import logging
import os
import re
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


def test_the_table_above_names_tests_that_exist():
    here = Path(__file__).parent
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", __doc__)
    assert len(named) >= 25
    missing = [f"{f}::{t}" for f, t in named if not re.search(rf"^def {t}\(", (here / f).read_text(), re.M)]
    assert not missing


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
    assert relayed == ["step 2  loss 0.5", "step 4  loss 0.5"]
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


# ---- config values that ran and published garbage --------------------------------------------


def test_inf_and_out_of_range_guidance_fail_before_any_stage(tmp_path):
    """`generate.guidance_scale: .inf` gave ten solid-black negatives, published."""
    import yaml

    from regdpo.config import ConfigError, load_config
    from tests.pipeline_helpers import small_config

    path = small_config(tmp_path)
    text = path.read_text()
    for value, why in ((".inf", "finite"), ("1.0e+38", "less than or equal to 50"), ("0.5", "greater than or equal to 1")):
        raw = yaml.safe_load(text)
        path.write_text(yaml.safe_dump(raw).replace("guidance_scale: 1.0", f"guidance_scale: {value}"))
        with pytest.raises(ConfigError, match=rf"generate\.guidance_scale: .*{why}"):
            load_config(path)
    with pytest.raises(ConfigError, match=r"train\.learning_rate: .*less than or equal to 1 \(got 1000.0\)"):
        load_config(small_config(tmp_path), {"train.learning_rate": 1e3})
    assert not (tmp_path / "run").exists()


# ---- a real (tiny) pipeline to break ----------------------------------------------------------

FAST_SAMPLES = {"samples": {"num_samples": 1, "num_inference_steps": 2, "guidance_scale": 1.0}}


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """ingest, generate, encode and train published on two real clips (one held out)."""
    from regdpo.config import load_config
    from regdpo.stages import run
    from tests.pipeline_helpers import small_config

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(small_config(root, evaluate=FAST_SAMPLES))
    for stage in ("ingest", "generate", "encode", "train"):
        run(cfg, stage)
    return root


def _copy(trained_root: Path, tmp_path: Path, overrides: dict | None = None):
    import shutil

    from regdpo.config import load_config

    root = tmp_path / "root"
    shutil.copytree(trained_root, root)
    return load_config(root / "config.yaml", overrides), root


def _rewrite_heldout_shard(cfg, edit) -> Path:
    """Rewrite the held-out shard's members through `edit(name, bytes) -> (name, bytes)`."""
    import io
    import tarfile

    shard = cfg.workdir_path / "shards" / "heldout" / "pairs-000000.tar"
    with tarfile.open(shard) as tf:
        members = [edit(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return shard


def test_a_crafted_shard_key_fails_naming_shard_and_key(trained_root, tmp_path):
    """A held-out sample keyed with `../` once wrote <key>-base.mp4 / <key>-tuned.mp4 outside the
    workdir: here beside a video the key points at (read as "the real clip", then written beside)."""
    from regdpo.stages import run

    cfg, root = _copy(trained_root, tmp_path)
    key = "../../../videos/cartoon_hills_pan"  # from <workdir>/.eval.partial/samples/ to <root>/videos/
    shard = _rewrite_heldout_shard(cfg, lambda name, data: (f"{key}.{name.split('.', 1)[1]}", data))
    with pytest.raises(ValueError, match=rf"{shard}: held-out sample: '{re.escape(key)}' is not a pair id"):
        run(cfg, "evaluate")
    assert sorted(p.name for p in (root / "videos").iterdir()) == ["cartoon_hills_pan.mp4", "manifest.csv",
                                                                   "snowy_traveler.mp4"]
    assert not (cfg.workdir_path / "eval").exists()


def test_nan_heldout_latents_are_refused_naming_the_sample(trained_root, tmp_path):
    from safetensors.torch import load, save

    from regdpo.stages import run

    cfg, _ = _copy(trained_root, tmp_path)

    def poison(name, data):
        if name.endswith(".pair.safetensors"):
            tensors = load(data)
            tensors["latents_w"].view(-1)[7] = float("nan")
            data = save(tensors)
        return name, data

    shard = _rewrite_heldout_shard(cfg, poison)
    key = json.loads((cfg.workdir_path / "shards" / "index.json").read_text())["splits"]["heldout"]["shards"][0]["pairs"][0]
    with pytest.raises(ValueError, match=rf"{shard}: held-out pair {key} holds non-finite values in latents_w"):
        run(cfg, "evaluate")
    assert not (cfg.workdir_path / "eval").exists()


def test_nan_weights_in_train_final_are_refused(trained_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from regdpo.stages import run

    cfg, _ = _copy(trained_root, tmp_path)
    lora = cfg.workdir_path / "train" / "final" / "pytorch_lora_weights.safetensors"
    tensors = load_file(lora)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, lora)
    with pytest.raises(ValueError, match=rf"{lora}: tensor {re.escape(name)} holds non-finite values"):
        run(cfg, "evaluate")
    assert not (cfg.workdir_path / "eval").exists()


def test_non_finite_held_out_errors_name_the_pair_and_shard():
    from regdpo.stages.evaluate import check_errors

    pairs = [{"key": "0123456789abcdef", "shard": "/w/shards/heldout/pairs-000000.tar"}]
    row = {"key": "0123456789abcdef", "t": 0.3, "err_base_w": 1.0, "err_base_l": 1.0, "err_tuned_w": float("nan"),
           "err_tuned_l": 1.0}
    with pytest.raises(ValueError, match=r"pairs-000000.tar: held-out pair 0123456789abcdef at t = 0.3 .*err_tuned_w"):
        check_errors([row], pairs)
    check_errors([{**row, "err_tuned_w": 2.0}], pairs)


# ---- divergence --------------------------------------------------------------------------------


def test_lr_1e3_fails_naming_the_learning_rate_and_publishes_nothing(shards, tmp_path):
    """The issue's case on the tiny preset: lr 1e3 published a LoRA with |w| = 1.5e4 (grad norm 0).
    A validated config refuses it; a config built around validation (model_copy) stops training."""
    from regdpo.train.divergence import TrainingDiverged

    cfg = train_config(tmp_path, max_steps=20, checkpoint_every=5, log_every=5)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e3})})
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"stopped after step 4: the trained weights reached \|w\| = .*"
                                               r"max_weight_abs \(100\).*lower train.learning_rate \(now 1000.0\)"):
        train(cfg, load_model(cfg.model), _urls(shards), out)
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_divergence_names_the_step_and_keeps_the_published_run(trained_root, tmp_path):
    """The train stage fails; the previously published train/ stays as it was."""
    from regdpo.stages import run
    from regdpo.train.divergence import TrainingDiverged

    cfg, _ = _copy(trained_root, tmp_path, {"train.learning_rate": 1.0, "train.log_every": 1,
                                            "train.divergence": {"max_weight_abs": 0.5}})
    published = cfg.workdir_path / "train"
    before = {p.relative_to(published): p.read_bytes() for p in published.rglob("*") if p.is_file()}
    with pytest.raises(TrainingDiverged, match=r"after step 0: .*\(0.5\).*lower train.learning_rate \(now 1.0\)"):
        run(cfg, "train", force=True)
    assert {p.relative_to(published): p.read_bytes() for p in published.rglob("*") if p.is_file()} == before


def test_a_loss_beyond_the_bound_blames_data_or_learning_rate(shards, tmp_path):
    from regdpo.train.divergence import TrainingDiverged, check_loss

    # step 0 of a LoRA run: the policy is the base model, so a loss this large is the pairs' doing
    cfg = train_config(tmp_path, max_steps=2, divergence={"max_loss": 10.0})
    with pytest.raises(TrainingDiverged, match=r"at step 0: loss .* exceeds train.divergence.max_loss \(10\); likely "
                                               r"cause: the data: the base model itself has a loss .* pair\(s\) pair0"):
        train(cfg, load_model(cfg.model), _urls(shards), tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()
    tc = cfg.train
    grown = {"step": 7, "loss": 50.0, "ref_err_w": 0.01}  # base: ln 2 + 500 x 0.01 = 5.7 < 10 < 50
    with pytest.raises(TrainingDiverged, match=r"at step 7: .*the policy diverged .* lower train.learning_rate"):
        check_loss(grown, ["pair0001"], tc)
    check_loss({**grown, "loss": 9.0}, ["pair0001"], tc)
    check_loss({**grown, "loss": None}, ["pair0001"], tc)  # non-finite: the skip-and-count path's business


def test_weights_beyond_the_bound_at_the_start_are_a_setting_not_a_divergence(shards, tmp_path):
    cfg = train_config(tmp_path, max_steps=2, finetune="full", divergence={"max_weight_abs": 0.5})
    with pytest.raises(ValueError, match=r"the weights training starts from .* already reach \|w\| = 1, beyond "
                                         r"train.divergence.max_weight_abs \(0.5\): raise it above 1"):
        train(cfg, load_model(cfg.model), _urls(shards), tmp_path / "out")
