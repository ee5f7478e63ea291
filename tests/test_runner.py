"""Stage runner semantics (regdpo.stages.runner, units, publish) with fake stages: no torch, no Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import regdpo.stages as stages
from regdpo.config import load_config
from regdpo.stages import journal as publish_mod
from regdpo.stages.runner import (
    STAGES,
    StageInputError,
    expected_fingerprint,
    is_current,
    plan_stage,
    read_stage_record,
    run_stage,
    stage_dir,
    stage_state,
)
from regdpo.stages.units import Staging, read_index
from tests.fakes import FakeUnits, hold_after, wait_for_sealed


class Recorder:
    """A fake whole-stage builder: records calls, writes one file, optionally fails."""

    def __init__(self, fail: BaseException | None = None):
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


def _manifest(config_path: Path, names: list[str]) -> Path:
    path = config_path.parent / "manifest.csv"
    path.write_text("path,caption\n" + "".join(f"{n}.mp4,a {n}\n" for n in names))
    return path


def _units(cfg, *names):
    for name in names:
        run_stage(cfg, name, FakeUnits(name))


def _items(cfg, name: str) -> dict[str, int]:
    folder = stage_dir(cfg.workdir, name) / "items"
    return {p.stem: p.stat().st_mtime_ns for p in folder.iterdir()}


# --- unit stages -------------------------------------------------------------------------------


def test_unit_stage_skips_when_current_and_counts_units(config_path):
    _manifest(config_path, ["a", "b", "c"])
    cfg = _cfg(config_path)
    first = run_stage(cfg, "ingest", FakeUnits("ingest"))
    assert not first.skipped
    assert first.summary == {"num_items": 3, "units_done": 3, "units_reused": 0, "units_failed": 0}
    assert json.loads((first.path / "items.json").read_text()) == ["a_mp4", "b_mp4", "c_mp4"]
    again = FakeUnits("ingest")
    second = run_stage(cfg, "ingest", again)
    assert second.skipped and again.calls == [] and second.fingerprint == first.fingerprint
    assert read_stage_record(cfg.workdir, "ingest")["fingerprint"] == first.fingerprint
    assert (first.path / "config.yaml").is_file() and is_current(cfg, "ingest", FakeUnits("ingest"))


def test_new_rows_cost_only_the_new_units(config_path):
    _manifest(config_path, [f"v{i}" for i in range(9)])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate")
    before = _items(cfg, "generate")
    _manifest(config_path, [f"v{i}" for i in range(10)])  # a nightly batch arrived
    assert stage_state(cfg, "ingest", FakeUnits("ingest")) == ("stale", "1 of 10 units to do")
    ingest = run_stage(cfg, "ingest", FakeUnits("ingest"))
    gen = run_stage(cfg, "generate", FakeUnits("generate"))
    assert (ingest.summary["units_done"], ingest.summary["units_reused"]) == (1, 9)
    assert (gen.summary["units_done"], gen.summary["units_reused"]) == (1, 9)
    after = _items(cfg, "generate")
    assert set(after) == set(before) | {"v9_mp4"}
    assert {k: after[k] for k in before} == before  # earlier outputs untouched (same mtime)
    assert len(read_index(Path(cfg.workdir), "generate")) == 10


def test_removed_rows_drop_out_and_changed_settings_redo(config_path):
    _manifest(config_path, ["a", "b", "c"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest")
    _manifest(config_path, ["a", "c"])
    result = run_stage(cfg, "ingest", FakeUnits("ingest"))
    assert result.summary["units_reused"] == 2 and result.summary["units_done"] == 0
    assert set(_items(cfg, "ingest")) == {"a_mp4", "c_mp4"}
    assert json.loads((result.path / "items.json").read_text()) == ["a_mp4", "c_mp4"]

    changed = _cfg(config_path, **{"ingest.min_side": 32})  # shapes every unit
    redo = run_stage(changed, "ingest", FakeUnits("ingest"))
    assert redo.summary["units_done"] == 2 and redo.summary["units_reused"] == 0
    placed = _cfg(config_path, **{"ingest.min_side": 32, "ingest.num_workers": 3, "model.device": "cuda:1"})
    assert run_stage(placed, "ingest", FakeUnits("ingest")).skipped  # runtime fields redo nothing


def test_force_redoes_every_unit(config_path):
    _manifest(config_path, ["a", "b"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest")
    forced = run_stage(cfg, "ingest", FakeUnits("ingest"), force=True)
    assert not forced.skipped and forced.summary["units_done"] == 2


def test_failed_unit_is_left_out_counted_and_retried(config_path):
    _manifest(config_path, ["a", "b", "c"])
    cfg = _cfg(config_path, **{"ingest.max_failed_fraction": 0.5})
    result = run_stage(cfg, "ingest", FakeUnits("ingest", fail_ids=("b_mp4",)))
    assert result.summary["units_failed"] == 1 and result.summary["num_items"] == 2
    assert result.summary["failed"] == [{"id": "b_mp4", "reason": "RuntimeError: cannot do b_mp4"}]
    assert stage_state(cfg, "ingest", FakeUnits("ingest")) == (
        "stale", "1 of 3 units to do; 1 failed in the last run: 1 x RuntimeError: cannot do b_mp4")
    retry = FakeUnits("ingest")
    again = run_stage(cfg, "ingest", retry)
    assert (again.summary["units_done"], again.summary["units_reused"], again.summary["units_failed"]) == (1, 2, 0)
    assert "failed" not in again.summary and not list(Staging(Path(cfg.workdir), "ingest").root.glob("*.failed.json"))


def test_device_processes_compute_with_the_callers_thread_count(config_path, tmp_path):
    """CPU kernels round differently with another intra-op thread count, so a device process
    uses its caller's: an item's bytes do not depend on which process did it."""
    import torch

    _manifest(config_path, ["a", "b", "c", "d"])
    cfg = _cfg(config_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # not the default of a fresh process
        run_stage(cfg, "ingest", FakeUnits("ingest", size=1, devices=["cpu:a", "cpu:b"]))
    finally:
        torch.set_num_threads(threads)
    index = read_index(Path(cfg.workdir), "ingest")
    assert len({r["pid"] for r in index.values()}) == 2 and {r["threads"] for r in index.values()} == {1}


def test_downstream_unit_stage_needs_its_input(config_path):
    with pytest.raises(StageInputError, match="run ingest first"):
        run_stage(_cfg(config_path), "generate", FakeUnits("generate"))


def test_two_device_processes_give_the_same_result_as_one(config_path, tmp_path):
    names = [f"v{i}" for i in range(6)]
    _manifest(config_path, names)
    one = _cfg(config_path)
    run_stage(one, "ingest", FakeUnits("ingest", size=1))
    two = _cfg(config_path, workdir=str(tmp_path / "two"))
    result = run_stage(two, "ingest", FakeUnits("ingest", size=1, devices=["cpu:a", "cpu:b"], delay_s=0.2))
    assert result.summary["units_done"] == 6
    index = read_index(Path(two.workdir), "ingest")
    assert {r["device"] for r in index.values()} == {"cpu:a", "cpu:b"}  # both processes worked
    assert len({r["pid"] for r in index.values()}) == 2
    assert read_stage_record(one.workdir, "ingest")["fingerprint"] == result.fingerprint
    assert sorted(_items(one, "ingest")) == sorted(_items(two, "ingest"))


_KILLABLE = hold_after(3) + """
import sys
from regdpo.config import load_config
from regdpo.stages.runner import run_stage
from tests.fakes import FakeUnits
run_stage(load_config(sys.argv[1]), "ingest", FakeUnits("ingest", size=1))
"""


def test_kill9_mid_stage_keeps_finished_units(config_path):
    import signal

    _manifest(config_path, [f"v{i}" for i in range(8)])
    cfg = _cfg(config_path)
    staging = Staging(Path(cfg.workdir), "ingest")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(config_path)], cwd=Path(__file__).parents[1])
    wait_for_sealed(staging, 3, proc)  # the child then holds its 4th unit open: the kill lands mid-unit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: (p.parent / f"{json.loads(p.read_text())['id']}.txt").stat().st_mtime_ns
                for p in staging.root.glob("*/unit.json")}
    assert len(finished) == 3
    assert read_stage_record(cfg.workdir, "ingest") is None  # nothing half-done is published
    assert stage_state(cfg, "ingest", FakeUnits("ingest")) == ("missing", "interrupted run present (finished units are kept)")

    result = run_stage(cfg, "ingest", FakeUnits("ingest"))
    assert result.summary["units_done"] == 8 and result.summary["num_items"] == 8
    index = read_index(Path(cfg.workdir), "ingest")
    published = _items(cfg, "ingest")
    for key, mtime in finished.items():  # finished before the kill: published, not redone
        assert published[index[key]["item"]] == mtime
    assert not staging.root.exists() or not list(staging.root.iterdir())


# --- the workdir lock ----------------------------------------------------------------------------

_HOLD = """
import sys, time
from regdpo.stages.lock import workdir_lock
with workdir_lock(sys.argv[1], command="regdpo run demo.yaml"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_fails_fast_naming_the_holder_and_a_dead_holder_is_recovered(config_path):
    import socket

    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, cfg.workdir], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(stages.WorkdirLocked) as err:
        run_stage(cfg, "ingest", FakeUnits("ingest"))
    message = str(err.value)
    assert f"pid {holder.pid} on host {socket.gethostname()} since" in message
    assert "regdpo run demo.yaml" in message and cfg.workdir in message
    holder.kill()  # kill -9: the lock is never released by its holder
    holder.wait()
    assert not run_stage(cfg, "ingest", FakeUnits("ingest")).skipped  # recovered


def test_lock_is_reentrant_in_one_process(config_path):
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    with stages.workdir_lock(cfg.workdir):
        run_stage(cfg, "ingest", FakeUnits("ingest"))  # takes the same lock again
    with stages.workdir_lock(cfg.workdir):
        pass


# --- the publish journal -------------------------------------------------------------------------


def test_kill_after_commit_is_completed_by_the_next_run(config_path, monkeypatch):
    _manifest(config_path, ["a", "b"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest")
    old_fp = read_stage_record(cfg.workdir, "ingest")["fingerprint"]
    _manifest(config_path, ["a", "b", "c"])
    real_apply = publish_mod._apply

    def die_halfway(workdir, journal):  # the journal is written (committed), nothing applied yet
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_mod, "_apply", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "ingest", FakeUnits("ingest"))
    assert read_stage_record(cfg.workdir, "ingest")["fingerprint"] == old_fp  # old output still whole
    assert stage_state(cfg, "ingest", FakeUnits("ingest"))[1] == "a publish was interrupted; the next run completes it"
    monkeypatch.setattr(publish_mod, "_apply", real_apply)
    nothing_to_do = FakeUnits("ingest")
    assert run_stage(cfg, "ingest", nothing_to_do).skipped and nothing_to_do.calls == []
    assert set(_items(cfg, "ingest")) == {"a_mp4", "b_mp4", "c_mp4"}


def test_kill_before_commit_leaves_the_old_output_and_no_temporaries(config_path, monkeypatch):
    _manifest(config_path, ["a", "b"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest")
    folder = stage_dir(cfg.workdir, "ingest")
    before = sorted(p.name for p in folder.rglob("*"))
    _manifest(config_path, ["a", "c"])

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_mod, "atomic_write_json", die)  # the journal write itself
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "ingest", FakeUnits("ingest"))
    assert sorted(p.name for p in folder.rglob("*")) == before  # old output whole, temporaries gone
    (folder / f"items.json{publish_mod.TMP_MARK}0123").write_text("what a kill -9 leaves")
    publish_mod.recover(cfg.workdir, ["ingest"])  # the next run does this first
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_journal_apply_is_idempotent_for_every_prefix(tmp_path):
    """A publish killed after any number of its operations ends in the same state when recovered."""
    def setup(root: Path) -> publish_mod.Transaction:
        (root / "stage").mkdir(parents=True)
        (root / "stage" / "old.txt").write_text("old")
        (root / "stage" / "t.json").write_text("v1")
        (root / "staging").mkdir()
        (root / "staging" / "new.txt").write_text("new")
        txn = publish_mod.Transaction(root, "stage")
        txn.write_bytes(root / "stage" / "t.json", b"v2")
        txn.move(root / "staging" / "new.txt", root / "stage" / "new.txt")
        txn.delete(root / "stage" / "old.txt")
        txn.delete(root / "staging")
        return txn

    def state(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}

    reference = tmp_path / "ref"
    setup(reference).commit()
    expected = state(reference)
    assert expected == {"stage/new.txt": "new", "stage/t.json": "v2"}
    for cut in range(5):
        root = tmp_path / f"cut{cut}"
        txn = setup(root)
        journal = root / publish_mod.JOURNAL_DIR / "stage.json"
        publish_mod.atomic_write_json(journal, {"name": "stage", "ops": txn.ops})
        ops = txn.ops[:cut]
        publish_mod.atomic_write_json(root / ".partial-ops.json", {"name": "stage", "ops": ops})
        publish_mod._apply(root, root / ".partial-ops.json")  # the first `cut` operations happened
        assert publish_mod.recover(root) == ["completed publish: stage"]
        assert state(root) == expected, cut


# --- whole stages --------------------------------------------------------------------------------


def test_whole_stage_skip_change_force(config_path):
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate", "encode")
    build = Recorder()
    first = run_stage(cfg, "train", build)
    assert not first.skipped and run_stage(cfg, "train", build).skipped and build.calls == 1
    assert (first.path / "result.txt").read_text() == "call 1" and (first.path / "config.yaml").is_file()
    assert not (first.path / "partial.json").exists()
    assert is_current(_cfg(config_path, **{"train.checkpoint_every": 7}), "train")  # a runtime field
    assert not is_current(_cfg(config_path, **{"train.beta": 500.0}), "train")
    assert not run_stage(cfg, "train", build, force=True).skipped and build.calls == 2

    # the shard set changed: train's input fingerprint changed
    _manifest(config_path, ["a", "b"])
    _units(cfg, "ingest", "generate", "encode")
    assert not is_current(cfg, "train")
    assert expected_fingerprint(cfg, "train")[1] == {"encode": read_stage_record(cfg.workdir, "encode")["fingerprint"]}


@pytest.mark.parametrize(("name", "missing"), [("train", "encode"), ("evaluate", "encode")])
def test_missing_input_names_the_stage_to_run(config_path, name, missing):
    build = Recorder()
    with pytest.raises(StageInputError, match=f"run {missing} first"):
        run_stage(_cfg(config_path), name, build)
    assert build.calls == 0 and not stage_dir(_cfg(config_path).workdir, name).exists()


def test_failed_rerun_keeps_previous_good_output(config_path):
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate", "encode")
    good = run_stage(cfg, "train", Recorder())
    with pytest.raises(RuntimeError):
        run_stage(cfg, "train", Recorder(fail=RuntimeError("disk full")), force=True)
    assert (good.path / "result.txt").read_text() == "call 1"
    assert read_stage_record(cfg.workdir, "train")["fingerprint"] == good.fingerprint and is_current(cfg, "train")


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
    (regdpo/stages/train.py continues only what its checkpoints allow)."""
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate", "encode")

    _interrupted(cfg, "train")
    assert stage_state(cfg, "train") == ("missing", "interrupted run present (resumes)")
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


def test_non_resumable_partial_is_discarded(config_path):
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate", "encode")
    run_stage(cfg, "train", Recorder())
    _interrupted(cfg, "evaluate")
    build = Recorder()
    run_stage(cfg, "evaluate", build)
    assert "checkpoint.bin" not in build.seen_in_out[0]


def test_kill_inside_the_swap_never_loses_the_finished_output(config_path, monkeypatch):
    """The publish window: once the journal is written, the new output wins; before, the
    finished partial is still there and resumable (it is never deleted)."""
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    _units(cfg, "ingest", "generate", "encode")
    run_stage(cfg, "train", Recorder())
    monkeypatch.setattr(publish_mod, "exchange", lambda a, b: False)  # the two-rename path

    real_replace = publish_mod.os.replace
    calls = {"n": 0}

    def dies_between_renames(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the old output moved aside, the new not yet in place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(publish_mod.os, "replace", dies_between_renames)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "train", Recorder(), force=True)
    monkeypatch.setattr(publish_mod.os, "replace", real_replace)
    assert stage_state(cfg, "train")[0] == "stale"
    skipped = Recorder()
    result = run_stage(cfg, "train", skipped)  # recovery completes the swap: nothing to redo
    assert result.skipped and skipped.calls == 0
    assert (result.path / "result.txt").read_text() == "call 1" and not list(Path(cfg.workdir).glob(".train.*"))


# --- regdpo.stages: lookup, ordering, up-front checks -----------------------------------------------


def test_get_impl_unknown_lists_stages():
    with pytest.raises(ValueError, match="ingest, generate, encode, train, evaluate"):
        stages.get_impl("finetune")


def test_run_uses_get_impl(config_path, fake_builders):
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    result = stages.run(cfg, "ingest")
    assert fake_builders == ["ingest"] and not result.skipped
    assert stages.run(cfg, "ingest").skipped and fake_builders == ["ingest"]


def test_plan_splits_pending_units_into_json_work_items(config_path):
    _manifest(config_path, ["a", "b", "c", "d", "e"])
    cfg = _cfg(config_path)
    plan = plan_stage(cfg, "ingest", impl=FakeUnits("ingest", size=2))
    assert [len(i.units) for i in plan.work_items] == [2, 2, 1]
    assert plan.counts == {"units": 5, "reused": 0, "staged": 0, "pending": 5, "work_items": 3}
    item = json.loads(json.dumps(plan.work_items[1].to_dict()))
    assert stages.WorkItem.from_dict(item) == plan.work_items[1]


def test_order_and_check_inputs(config_path):
    assert stages.order(None) == list(STAGES)
    assert stages.order(["evaluate", "ingest"]) == ["ingest", "evaluate"]
    with pytest.raises(ValueError, match="unknown stage"):
        stages.order(["ingset"])
    _manifest(config_path, ["a"])
    cfg = _cfg(config_path)
    stages.check_inputs(cfg, STAGES)  # the whole pipeline needs nothing on disk
    stages.check_inputs(cfg, ["ingest", "generate"])
    with pytest.raises(StageInputError, match="run ingest first"):
        stages.check_inputs(cfg, ["generate"])
    with pytest.raises(StageInputError, match="run generate first"):
        stages.check_inputs(cfg, ["ingest", "encode"])
    (config_path.parent / "manifest.csv").unlink()
    with pytest.raises(StageInputError, match="ingest.manifest .* does not exist"):
        stages.check_inputs(cfg, ["ingest"])
    no_model = _cfg(config_path, **{"model.preset": None, "model.path": "nowhere"})
    with pytest.raises(StageInputError, match=r"model.path .*nowhere does not exist"):
        stages.check_inputs(no_model, ["train"])
    # every problem at once: the manifest, the model path, what to run first
    with pytest.raises(StageInputError) as err:
        stages.check_inputs(no_model, ["ingest", "encode"])
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems, before any stage ran:"
    assert [line.split()[1] for line in lines[1:]] == ["ingest.manifest", "model.path", "stage"]
    assert "run generate first" in lines[3]


def test_importing_stages_does_not_import_torch_or_prefect():
    code = "import sys, regdpo.stages, regdpo.cli; print(json.dumps(['torch' in sys.modules, 'prefect' in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False]


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
    _units(cfg, "ingest", "generate", "encode")
    run_stage(cfg, "train", Recorder())
    assert is_current(cfg, "train")
    weights.write_bytes(b"v2-finetuned")
    os.utime(weights, ns=(1, 1))
    assert not is_current(cfg, "train")


def test_evaluate_without_a_heldout_split_fails_before_anything_runs(config_path):
    cfg = _cfg(config_path, **{"ingest.heldout_fraction": 0.0, "ingest.min_heldout": 0})
    with pytest.raises(StageInputError, match="evaluate needs held-out clips.*ingest.min_heldout >= 1"):
        stages.check_inputs(cfg, STAGES)
    stages.check_inputs(cfg, ["ingest", "generate", "encode", "train"])  # fine without evaluate
    shards = Path(cfg.workdir) / "shards"
    shards.mkdir(parents=True)
    (shards / "index.json").write_text(json.dumps({"splits": {"train": {"num_samples": 3, "shards": []}}}))
    with pytest.raises(StageInputError, match="has none"):
        stages.check_inputs(_cfg(config_path), ["train", "evaluate"])


def test_a_batched_worker_fails_only_the_bad_unit(tmp_path):
    """A batch that raises is redone one unit at a time; a unit whose result carries an error
    (or raises alone) fails with its reason; its neighbours are done, in every path."""
    from regdpo.stages.units import BatchedUnitWorker, Staging, Unit

    class Worker(BatchedUnitWorker):
        batch_size = 3
        calls: list[int] = []

        def process_units(self, units, outs):
            self.calls.append(len(units))
            if len(units) > 1 and any(u.spec["kind"] == "raises" for u in units):
                raise RuntimeError("the batch cannot run")
            if any(u.spec["kind"] == "raises" for u in units):
                raise RuntimeError("this clip is broken")
            return {u.key: ({"error": "constant frames"} if u.spec["kind"] == "degenerate" else {"n": 1})
                    for u in units}

    kinds = ["ok", "raises", "degenerate", "ok", "degenerate", "ok"]
    units = [Unit(f"u{i}", f"{i:016x}", {"kind": k}) for i, k in enumerate(kinds)]
    staging = Staging(tmp_path, "generate")
    counts = Worker().process_batch(units, staging)
    assert counts == {"done": 3, "failed": 3}
    assert Worker.calls == [3, 1, 1, 1, 3]  # first batch redone one by one, the second kept whole
    assert [u.id for u in units if staging.is_done(u.key)] == ["u0", "u3", "u5"]
    reasons = {f["id"]: f["reason"] for f in staging.failures().values()}
    # an unusable result reads the same whether its batch ran whole or was redone unit by unit
    assert reasons == {"u1": "RuntimeError: this clip is broken", "u2": "constant frames", "u4": "constant frames"}
    # nothing but sealed units and failure notes is left (no half-written folder)
    assert sorted(p.name for p in staging.root.iterdir()) == sorted(
        [units[i].key for i in (0, 3, 5)] + [f"{units[i].key}.failed.json" for i in (1, 2, 4)])
