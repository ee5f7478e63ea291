"""Acceptance of the trainer at scale, on the demo shards (configs/demo.yaml's clips through
ingest, generate and encode), through the commands the README gives:

- 12 steps at global batch 4: 2 CPU processes (the stage's own torchrun, gloo, via
  `regdpo run ... --stage train`), 1 process, and 1 process with 2 accumulation steps write
  the same metrics.jsonl (relative 1e-3); FSDP2 over 2 processes too (synthetic shards), with
  its checkpoint resumed;
- kill -9 in the middle of a 30-step run with LoRA dropout, rerun: metrics.jsonl identical to
  an uninterrupted run;
- continuing: a raised max_steps continues the published run, a manifest that gained a row
  continues over the enlarged shard set as a new segment, changed settings / --force /
  train.resume: fresh start at step 0.

Run: .venv/bin/pytest tests/test_distributed.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from regdpo.config import load_config
from regdpo.stages import run
from regdpo.train.observe import TIMING_KEYS
from tests.test_train_fixtures import read_rows, synthetic_pairs, train_config, write_shards

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SAMPLES = ROOT / "data" / "samples"
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _manifest(path: Path, rows: int) -> Path:
    """The demo manifest's first `rows` rows, beside copies of the sample videos."""
    lines = (SAMPLES / "manifest.csv").read_text().splitlines()
    for line in lines[1:rows + 1]:
        name = line.split(",", 1)[0]
        if not (path.parent / name).exists():
            shutil.copy(SAMPLES / name, path.parent / name)
    path.write_text("\n".join(lines[:rows + 1]) + "\n")
    return path


def _config(root: Path, workdir: Path, rows: int = 9, **train) -> Path:
    """configs/demo.yaml with its own workdir and manifest; every clip in the train split."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["workdir"] = str(workdir)
    raw["ingest"].update(manifest=str(_manifest(root / f"manifest-{rows}.csv", rows)), heldout_fraction=0.0,
                         min_heldout=0)
    raw["train"].update({"max_steps": 12, "batch_size": 4, "checkpoint_every": 100, **train})
    path = root / f"config-{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A workdir holding the demo clips' pair shards (9 clips), no train stage yet."""
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(_config(root, root / "work"))
    for stage in ("ingest", "generate", "encode"):
        run(cfg, stage)
    return root / "work"


def _workdir(demo: Path, tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    shutil.copytree(demo, work)
    return work


def _trajectory(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_rows(workdir / "train" / "metrics.jsonl")]


def _assert_same(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=rel, abs=1e-6), (ra["step"], key)
            else:
                assert rb[key] == value, (ra["step"], key)


def test_two_processes_one_process_and_accumulation_train_alike(demo, tmp_path):
    runs = {}
    # 2 processes: the README's command; the stage launches torchrun (gloo on CPU) itself
    work = _workdir(demo, tmp_path, "two")
    config = _config(tmp_path, work)
    cli = subprocess.run([sys.executable, "-m", "regdpo.cli", "run", str(config), "--stage", "train",
                          "--set", "train.num_processes=2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    runs["two"] = _trajectory(work)
    for name, train in {"one": {}, "accumulate": {"gradient_accumulation_steps": 2}}.items():
        work = _workdir(demo, tmp_path, name)
        result = run(load_config(_config(tmp_path, work, **train)), "train")
        assert result.summary["processes"] == 1
        runs[name] = _trajectory(work)
    assert len(runs["one"]) == 12 and runs["one"][-1]["s"] != 0.0
    for name in ("two", "accumulate"):
        _assert_same(runs["one"], runs[name], rel=1e-3)


def test_fsdp_two_processes_checkpoint_resume_and_export(tmp_path):
    """FSDP2 over 2 processes (the stage's torchrun) matches one process step for step, writes
    its checkpoint with torch.distributed.checkpoint in safetensors (no pickle), resumes from
    it, and exports the gathered LoRA."""
    from regdpo.models import load_model
    from regdpo.train import launch
    from regdpo.train.loop import train
    from regdpo.train.loader import PairSource
    from safetensors.torch import load_file

    shards = write_shards(tmp_path / "shards", synthetic_pairs(6), 3)
    one = train_config(tmp_path, max_steps=4, batch_size=2)
    train(one, load_model(one.model), PairSource.from_index(shards), tmp_path / "one")
    out = tmp_path / "fsdp"
    for steps in (2, 4):  # the second launch resumes from step-000002 (DCP)
        cfg = train_config(tmp_path, max_steps=steps, batch_size=2, num_processes=2, parallelism="fsdp")
        summary = launch.run_plan({"config": cfg.model_dump(mode="json"), "out": str(out), "shards": str(shards)})
    assert summary["resumed_from"] == "step-000002" and summary["processes"] == 2
    files = sorted(p.name for p in (out / "checkpoints" / "step-000004" / "dcp").rglob("*") if p.is_file())
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files
    want = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_rows(tmp_path / "one" / "metrics.jsonl")]
    got = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_rows(out / "metrics.jsonl")]
    _assert_same(want, got, rel=1e-3)
    a = load_file(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_metrics(demo, tmp_path):
    train = {"max_steps": 30, "batch_size": 2, "checkpoint_every": 5, "lora": {"rank": 8, "alpha": 8, "dropout": 0.1}}
    straight = _workdir(demo, tmp_path, "straight")
    run(load_config(_config(tmp_path, straight, **train)), "train")

    work = _workdir(demo, tmp_path, "killed")
    config = _config(tmp_path, work, **train)
    command = [sys.executable, "-m", "regdpo.train.launch", str(config)]
    partial = work / ".train.partial" / "metrics.jsonl"
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 13:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (work / "train").exists()
    logged = len(read_rows(partial))
    assert 13 <= logged < 30

    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = load_config(config)
    assert (work / "train" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert _trajectory(work) == _trajectory(straight)
    assert summary.train.max_steps == len(_trajectory(work))


def test_continuing_published_runs(demo, tmp_path):
    work = _workdir(demo, tmp_path, "cont")
    first = run(load_config(_config(tmp_path, work, max_steps=4)), "train")
    assert first.summary["start"] == "starting fresh at step 0"
    four = _trajectory(work)

    # max_steps raised: the finished run continues (no restart at step 0), as if never stopped
    raised = run(load_config(_config(tmp_path, work, max_steps=6)), "train")
    assert raised.summary["start"].startswith("continuing the published run from step-000004")
    straight = _workdir(demo, tmp_path, "straight6")
    run(load_config(_config(tmp_path, straight, max_steps=6)), "train")
    assert _trajectory(work)[:4] == four and _trajectory(work) == _trajectory(straight)

    # the manifest gained a row: only the new clip is encoded, training continues over all pairs
    grown = load_config(_config(tmp_path, work, rows=10, max_steps=3))
    for stage in ("ingest", "generate", "encode"):
        run(grown, stage)
    cont = run(grown, "train")
    assert cont.summary["start"].startswith("continuing the published run from step-000006 (the shard set grew")
    assert cont.summary["segment"] == 1 and cont.summary["steps"] == 9 and cont.summary["num_pairs"] == 10
    rows = _trajectory(work)
    assert [r["step"] for r in rows] == list(range(9)) and rows[:6] == _trajectory(straight)

    # changed training settings start fresh; so do --force and train.resume: fresh
    beta = run(load_config(_config(tmp_path, work, rows=10, max_steps=3, beta=500.0)), "train")
    assert beta.summary["start"] == "starting fresh at step 0" and beta.summary["steps"] == 3
    forced = run(load_config(_config(tmp_path, work, rows=10, max_steps=5, beta=500.0)), "train", force=True)
    assert forced.summary["start"] == "starting fresh at step 0"
    fresh = run(load_config(_config(tmp_path, work, rows=10, max_steps=6, beta=500.0, resume="fresh")), "train")
    assert fresh.summary["start"] == "starting fresh at step 0" and len(_trajectory(work)) == 6
