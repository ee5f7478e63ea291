"""Stage runner semantics (regdpo.stages.runner and regdpo.stages) with tiny fake builders: no torch, no Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import regdpo.stages as stages
from regdpo.config import load_config
from regdpo.stages.runner import (
    STAGES,
    StageInputError,
    expected_fingerprint,
    is_current,
    read_stage_record,
    run_stage,
    stage_dir,
)


class Recorder:
    """A fake builder: records calls, writes one file, optionally fails."""

    def __init__(self, fail: Exception | None = None):
        self.calls = 0
        self.fail = fail
        self.seen_in_out: list[list[str]] = []
        self.contexts: list = []

    def __call__(self, ctx) -> dict:
        out = ctx.out
        self.contexts.append(ctx)
        self.calls += 1
        self.seen_in_out.append(sorted(p.name for p in out.iterdir()))
        (out / "result.txt").write_text(f"call {self.calls}")
        if self.fail is not None:
            raise self.fail
        return {"num_items": self.calls}


def _cfg(config_path: Path, **overrides):
    return load_config(config_path, overrides or None)


def _run_chain(cfg, names):
    for name in names:
        run_stage(cfg, name, Recorder())


def test_skip_when_current(config_path):
    cfg = _cfg(config_path)
    build = Recorder()
    first = run_stage(cfg, "ingest", build)
    second = run_stage(cfg, "ingest", build)
    assert not first.skipped and second.skipped
    assert build.calls == 1
    assert second.fingerprint == first.fingerprint
    assert second.summary == {"num_items": 1}
    assert first.path == stage_dir(cfg.workdir, "ingest")
    rec = read_stage_record(cfg.workdir, "ingest")
    assert rec["fingerprint"] == first.fingerprint and rec["summary"] == {"num_items": 1}
    assert (first.path / "config.yaml").is_file() and (first.path / "result.txt").is_file()


def test_changed_section_reruns_only_that_stage(config_path):
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest"])
    # train settings do not shape ingest's output
    assert is_current(_cfg(config_path, **{"train.max_steps": 5}), "ingest")
    changed = _cfg(config_path, **{"ingest.min_side": 32})
    assert not is_current(changed, "ingest")
    build = Recorder()
    assert not run_stage(changed, "ingest", build).skipped
    assert build.calls == 1


def test_downstream_fingerprint_follows_upstream(config_path):
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest", "generate"])
    before, upstream = expected_fingerprint(cfg, "generate")
    assert upstream == {"ingest": read_stage_record(cfg.workdir, "ingest")["fingerprint"]}
    assert is_current(cfg, "generate")

    changed = _cfg(config_path, **{"ingest.heldout_fraction": 0.2})
    run_stage(changed, "ingest", Recorder())
    after, _ = expected_fingerprint(changed, "generate")
    assert after != before
    assert not is_current(changed, "generate")  # generate's own settings did not change
    build = Recorder()
    assert not run_stage(changed, "generate", build).skipped and build.calls == 1


def test_force_reruns_a_current_stage(config_path):
    cfg = _cfg(config_path)
    build = Recorder()
    run_stage(cfg, "ingest", build)
    result = run_stage(cfg, "ingest", build, force=True)
    assert not result.skipped and build.calls == 2
    assert (result.path / "result.txt").read_text() == "call 2"


@pytest.mark.parametrize(("name", "missing"), [("generate", "ingest"), ("encode", "ingest"), ("train", "encode")])
def test_missing_input_names_the_stage_to_run(config_path, name, missing):
    cfg = _cfg(config_path)
    build = Recorder()
    with pytest.raises(StageInputError, match=f"run {missing} first"):
        run_stage(cfg, name, build)
    assert build.calls == 0
    assert not stage_dir(cfg.workdir, name).exists()


def test_failed_build_publishes_nothing(config_path):
    cfg = _cfg(config_path)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(cfg, "ingest", Recorder(fail=RuntimeError("boom")))
    assert not stage_dir(cfg.workdir, "ingest").exists()
    assert read_stage_record(cfg.workdir, "ingest") is None
    assert not is_current(cfg, "ingest")


def test_failed_rerun_keeps_previous_good_output(config_path):
    cfg = _cfg(config_path)
    good = run_stage(cfg, "ingest", Recorder())
    with pytest.raises(RuntimeError):
        run_stage(cfg, "ingest", Recorder(fail=RuntimeError("disk full")), force=True)
    assert (good.path / "result.txt").read_text() == "call 1"
    assert read_stage_record(cfg.workdir, "ingest")["fingerprint"] == good.fingerprint
    assert is_current(cfg, "ingest")


def _interrupted(cfg, name: str) -> Path:
    """Run `name` with a builder that dies midway; return its partial directory."""
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, name, Recorder(fail=KeyboardInterrupt()))
    partial = Path(cfg.workdir) / f".{stage_dir(cfg.workdir, name).name}.partial"
    assert partial.is_dir() and (partial / "partial.json").is_file()
    (partial / "checkpoint.bin").write_text("step 3")
    return partial


def test_resumable_partial_is_handed_back_with_its_fingerprint(config_path):
    """train gets an interrupted partial back and is told which settings started it; it decides
    (regdpo/stages/train.py continues only a same-fingerprint run)."""
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest", "generate", "encode"])

    _interrupted(cfg, "train")
    resumed = Recorder()
    result = run_stage(cfg, "train", resumed)
    assert "checkpoint.bin" in resumed.seen_in_out[0]
    assert resumed.contexts[0].interrupted_fingerprint == result.fingerprint == resumed.contexts[0].fingerprint
    assert resumed.contexts[0].previous is None
    assert not (stage_dir(cfg.workdir, "train") / "partial.json").exists()

    other = _cfg(config_path, **{"train.learning_rate": 2e-4})
    _interrupted(other, "train")
    changed = Recorder()
    run_stage(_cfg(config_path, **{"train.learning_rate": 3e-4}), "train", changed)
    ctx = changed.contexts[0]
    assert "checkpoint.bin" in changed.seen_in_out[0]
    assert ctx.interrupted_fingerprint == expected_fingerprint(other, "train")[0] != ctx.fingerprint
    assert ctx.previous == stage_dir(cfg.workdir, "train")  # the published run, to continue from


def test_train_stage_discards_an_interrupted_run_with_other_settings(config_path, monkeypatch):
    from regdpo.stages import train as train_stage

    seen: list[list[str]] = []
    monkeypatch.setattr(train_stage, "shard_urls", lambda *a: [])
    monkeypatch.setattr(train_stage, "load_spec", lambda cfg: None)
    monkeypatch.setattr(train_stage, "train", lambda cfg, spec, urls, out: seen.append(sorted(
        p.name for p in out.iterdir())) or {"steps": 0})
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest", "generate", "encode"])
    _interrupted(cfg, "train")
    run_stage(cfg, "train", train_stage.build)
    assert "checkpoint.bin" in seen[-1]
    other = _cfg(config_path, **{"train.learning_rate": 2e-4})
    _interrupted(other, "train")
    run_stage(_cfg(config_path, **{"train.learning_rate": 3e-4}), "train", train_stage.build)
    assert len(seen) == 2 and "checkpoint.bin" not in seen[-1]


def test_non_resumable_partial_is_discarded(config_path):
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest"])
    _interrupted(cfg, "generate")
    build = Recorder()
    run_stage(cfg, "generate", build)
    assert "checkpoint.bin" not in build.seen_in_out[0]


# --- regdpo.stages: builder lookup, ordering, up-front input check ---------------------------


def test_get_builder_unknown_lists_stages():
    with pytest.raises(ValueError, match="ingest, generate, encode, train, evaluate"):
        stages.get_builder("finetune")


def test_run_uses_get_builder(config_path, fake_builders):
    cfg = _cfg(config_path)
    result = stages.run(cfg, "ingest")
    assert fake_builders == ["ingest"] and not result.skipped
    assert stages.run(cfg, "ingest").skipped and fake_builders == ["ingest"]


def test_order_and_check_inputs(config_path):
    assert stages.order(None) == list(STAGES)
    assert stages.order(["evaluate", "ingest"]) == ["ingest", "evaluate"]
    with pytest.raises(ValueError, match="unknown stage"):
        stages.order(["ingset"])
    cfg = _cfg(config_path)
    stages.check_inputs(cfg, STAGES)  # the whole pipeline needs nothing on disk
    stages.check_inputs(cfg, ["ingest", "generate"])
    with pytest.raises(StageInputError, match="run ingest first"):
        stages.check_inputs(cfg, ["generate"])
    with pytest.raises(StageInputError, match="run generate first"):
        stages.check_inputs(cfg, ["ingest", "encode"])


def test_importing_stages_does_not_import_torch_or_prefect():
    code = "import sys, regdpo.stages, regdpo.cli; print(json.dumps(['torch' in sys.modules, 'prefect' in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False]


def test_manifest_with_new_rows_redoes_ingest_and_downstream(config_path):
    manifest = config_path.parent / "manifest.csv"
    manifest.write_text("path,caption\na.mp4,a cat\n")
    cfg = _cfg(config_path)
    _run_chain(cfg, ["ingest", "generate"])
    assert is_current(cfg, "ingest") and is_current(cfg, "generate")
    manifest.write_text("path,caption\na.mp4,a cat\nb.mp4,a dog\n")  # a nightly batch arrived
    assert not is_current(cfg, "ingest")
    build = Recorder()
    assert not run_stage(cfg, "ingest", build).skipped and build.calls == 1
    assert not is_current(cfg, "generate")  # its input changed: it reruns on the next pipeline run


def test_replaced_model_weights_redo_model_stages(tmp_path):
    import os

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text("{}")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"v1")
    (tmp_path / "manifest.csv").write_text("path,caption\na.mp4,a cat\n")
    (tmp_path / "cfg.yaml").write_text(
        "workdir: ./run\nmodel: {path: ./model}\nvideo: {fps: 8, num_frames: 9, height: 32, width: 32}\n"
        "ingest: {manifest: ./manifest.csv}\n"
    )
    cfg = load_config(tmp_path / "cfg.yaml")
    _run_chain(cfg, ["ingest", "generate"])
    assert is_current(cfg, "generate")
    weights.write_bytes(b"v2-finetuned")
    os.utime(weights, ns=(1, 1))
    assert is_current(cfg, "ingest") and not is_current(cfg, "generate")
