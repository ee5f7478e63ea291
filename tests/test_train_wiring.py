"""What pins the DPO wiring of the trainer, each test failing under the change it guards:
winner and loser swapped, the loser with its own noise or t, the reference equal to the
policy (each reference mode), objective sft running the reference or the loser; plus a golden
loss trajectory, DPO reaching implicit accuracy 1 on a few pairs, the precomputed reference,
float32 master weights under bf16, non-finite steps and EMA.

Run: .venv/bin/pytest tests/test_train_wiring.py
"""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regdpo.flow_matching import flow_noisy, flow_target, pair_noise
from regdpo.losses import per_sample_error
from regdpo.models import load_model
from regdpo.train import loop
from regdpo.train.loader import PairOrder, PairSource, ShardReader
from regdpo.train.loop import train
from regdpo.train.rng import pair_generator
from tests.test_train_fixtures import read_rows, synthetic_pairs, train_config, write_shards

GOLDEN = Path(__file__).parent / "assets" / "losses" / "tiny_reg_dpo_20_steps.json"
TRAJECTORY_KEYS = ("loss", "dpo_loss", "s", "dgr", "win_gap", "lose_gap", "implicit_acc", "grad_norm")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wiring") / "shards", synthetic_pairs(6), 4)


def _train(cfg, shards, out):
    return train(cfg, load_model(cfg.model), PairSource.from_index(shards), out)


def independent_errors(cfg, shards, step: int, denoiser) -> dict[str, float]:
    """err_w and err_l (means over the step's pairs) of `denoiser` at step `step`, recomputed from
    scratch: the step's pairs from the data order, each pair's ONE (ε, t) from (seed, step,
    global index) applied to its winner and to its loser."""
    tc, spec = cfg.train, load_model(cfg.model)
    source = PairSource.from_index(shards)
    order, reader = PairOrder(source.num_pairs, tc.seed, 0), ShardReader(source)
    errs = {"err_w": [], "err_l": []}
    for i in range(tc.batch_size):
        pair = reader.read(order(step * tc.batch_size + i))
        g = pair_generator(tc.seed, step, i)
        noise = pair_noise(pair["latents_w"][None], g)
        t = spec.sample_timesteps(1, tc.timesteps, g)
        cond = {"prompt_embeds": pair["prompt_embeds"][None]}
        with torch.no_grad():
            for member, key in (("latents_w", "err_w"), ("latents_l", "err_l")):
                x0 = pair[member][None]
                pred = spec.predict(denoiser, flow_noisy(x0, noise, t), t, cond)
                errs[key].append(per_sample_error(pred, flow_target(x0, noise)).item())
    return {k: sum(v) / len(v) for k, v in errs.items()}


def test_winner_loser_and_their_shared_draw(shards, tmp_path):
    """Step 0's logged errors are the base model's on the right members at the shared (t, ε):
    swapping winner and loser, or giving the loser its own noise or t, changes them."""
    cfg = train_config(tmp_path, max_steps=1)
    _train(cfg, shards, tmp_path / "out")
    row = read_rows(tmp_path / "out" / "metrics.jsonl")[0]
    want = independent_errors(cfg, shards, 0, load_model(cfg.model).load_denoiser())
    assert row["err_w"] == pytest.approx(want["err_w"], rel=1e-5)
    assert row["err_l"] == pytest.approx(want["err_l"], rel=1e-5)
    assert abs(want["err_w"] - want["err_l"]) > 1e-2  # the test can tell the two apart


@pytest.mark.parametrize("finetune, reference", [("lora", "adapters-off"), ("full", "copy"), ("lora", "precomputed")])
def test_reference_is_the_base_model_not_the_policy(shards, tmp_path, finetune, reference):
    """After the policy has moved, the logged reference errors are still the base model's at
    that step's draws, and differ from the policy's."""
    lr = 1e-3 if finetune == "lora" else 1e-4
    cfg = train_config(tmp_path, max_steps=3, finetune=finetune, reference=reference, learning_rate=lr)
    _train(cfg, shards, tmp_path / "out")
    row = read_rows(tmp_path / "out" / "metrics.jsonl")[2]
    base = independent_errors(cfg, shards, 2, load_model(cfg.model).load_denoiser())
    assert row["ref_err_w"] == pytest.approx(base["err_w"], rel=1e-5)
    assert row["ref_err_l"] == pytest.approx(base["err_l"], rel=1e-5)
    assert abs(row["err_w"] - row["ref_err_w"]) > 1e-6 * row["ref_err_w"]  # the policy did move


def test_precomputed_holds_no_reference_model_and_matches_adapters_off(shards, tmp_path, monkeypatch):
    cfg = train_config(tmp_path, max_steps=3, reference="precomputed")
    spec = load_model(cfg.model)
    built: list[weakref.ref] = []
    alive_when_policy_built: list[bool] = []
    real_load = type(spec).load_denoiser

    def load_denoiser(self, **kwargs):
        alive_when_policy_built.extend(ref() is not None for ref in built)
        model = real_load(self, **kwargs)
        built.append(weakref.ref(model))
        return model

    def no_toggle(*args, **kwargs):
        raise AssertionError("the precomputed reference toggled adapters: it used the policy as reference")

    monkeypatch.setattr(type(spec), "load_denoiser", load_denoiser)
    monkeypatch.setattr(type(spec), "set_adapters_enabled", no_toggle)
    summary = train(cfg, spec, PairSource.from_index(shards), tmp_path / "pre")
    assert summary["reference"] == "precomputed"
    assert len(built) == 2 and alive_when_policy_built == [False]  # the precompute model was freed first
    table = load_file(tmp_path / "pre" / "reference" / "segment-0.safetensors")["ref_err"]
    assert table.shape == (3, cfg.train.batch_size, 2)
    monkeypatch.undo()

    off = train_config(tmp_path, max_steps=3, reference="adapters-off")
    _train(off, shards, tmp_path / "off")
    a, b = read_rows(tmp_path / "pre" / "metrics.jsonl"), read_rows(tmp_path / "off" / "metrics.jsonl")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)
    for ra, rb in zip(a, b):
        for key in TRAJECTORY_KEYS:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-7), (ra["step"], key)


def test_sft_runs_neither_reference_nor_loser(shards, tmp_path, monkeypatch):
    cfg = train_config(tmp_path, max_steps=2, objective="sft")
    spec = load_model(cfg.model)
    batch_sizes = []
    real_predict = type(spec).predict

    def predict(self, denoiser, noisy, t, cond):
        batch_sizes.append(noisy.shape[0])
        return real_predict(self, denoiser, noisy, t, cond)

    monkeypatch.setattr(type(spec), "predict", predict)
    monkeypatch.setattr(type(spec), "set_adapters_enabled", lambda *a, **k: pytest.fail("reference run for sft"))
    summary = train(cfg, spec, PairSource.from_index(shards), tmp_path / "out")
    assert summary["reference"] is None
    assert batch_sizes == [cfg.train.batch_size] * 2  # winners only, one forward per step
    row = read_rows(tmp_path / "out" / "metrics.jsonl")[0]
    assert row["loss"] == pytest.approx(row["err_w"]) and "dpo_loss" not in row and "err_l" not in row


def test_golden_loss_trajectory(shards, tmp_path):
    """20 tiny CPU steps against tests/assets/losses (REGDPO_UPDATE_GOLDEN=1 rewrites it)."""
    cfg = train_config(tmp_path, max_steps=20, batch_size=2, checkpoint_every=100)
    _train(cfg, shards, tmp_path / "out")
    got = [{k: r[k] for k in ("step", *TRAJECTORY_KEYS)} for r in read_rows(tmp_path / "out" / "metrics.jsonl")]
    if os.environ.get("REGDPO_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": cfg.train.model_dump(mode="json"), "steps": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["steps"]
    assert [r["step"] for r in got] == list(range(20))
    for g, w in zip(got, want):
        for key in TRAJECTORY_KEYS:
            assert g[key] == pytest.approx(w[key], rel=1e-3, abs=1e-6), (g["step"], key)


def test_dpo_reaches_implicit_accuracy_one_on_a_few_pairs(tmp_path):
    """Objective dpo on 3 pairs: afterwards the tuned model prefers every winner (s < 0) at
    draws it never trained on."""
    shards = write_shards(tmp_path / "shards", synthetic_pairs(3, seed=7), 3)
    cfg = train_config(tmp_path, objective="dpo", max_steps=12, batch_size=3, learning_rate=2e-3,
                       checkpoint_every=100, lora={"rank": 8, "alpha": 8})
    _train(cfg, shards, tmp_path / "out")
    assert read_rows(tmp_path / "out" / "metrics.jsonl")[-1]["implicit_acc"] == 1.0
    spec = load_model(cfg.model)
    base, tuned = spec.load_denoiser(), spec.load_denoiser()
    spec.add_lora(tuned, cfg.train.lora)
    spec.load_lora(tuned, tmp_path / "out" / "final")
    held_out = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1234})})
    for step in range(4):  # 4 fresh (t, ε) per pair, from another seed
        b = independent_errors(held_out, shards, step, base)
        t = independent_errors(held_out, shards, step, tuned)
        assert (t["err_w"] - t["err_l"]) - (b["err_w"] - b["err_l"]) < 0


def test_bf16_full_finetuning_changes_every_trained_tensor(shards, tmp_path):
    """model.dtype bfloat16, lr 1e-5, one step: the float32 masters take the update everywhere
    (AdamW on bf16 weights changed 3.8% of them), and final/ exports those masters."""
    from regdpo.train import distributed as D
    from regdpo.train.lineage import fresh_state
    from regdpo.train.loader import Split, make_loader

    cfg = train_config(tmp_path, max_steps=1, finetune="full", learning_rate=1e-5, reference="precomputed")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    spec, source, split = load_model(cfg.model), PairSource.from_index(shards), Split(cfg.train.batch_size)
    ctx = D.init("cpu")
    run = loop._build(cfg, spec, ctx, source, split, tmp_path / "out", fresh_state("test", source), "test", 1)
    before = {n: p.detach().clone() for n, p in run.params.items()}
    loop.train_step(run, list(make_loader(source, split, seed=0, segment=0, segment_start=0, start_step=0,
                                          end_step=1)))
    unchanged = [n for n, p in run.params.items() if torch.equal(p, before[n])]
    assert not unchanged, f"{len(unchanged)} of {len(before)} tensors unchanged, e.g. {unchanged[:3]}"
    changed = sum(int((p != before[n]).sum()) for n, p in run.params.items())
    assert changed / sum(p.numel() for p in before.values()) > 0.9
    loop.export_final(run, tmp_path / "out" / "final")
    exported = load_file(next((tmp_path / "out" / "final" / "transformer").glob("*.safetensors")))
    assert all(torch.equal(exported[n], p.detach()) for n, p in run.params.items())


def test_a_nan_batch_is_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path / "shards", synthetic_pairs(6, nan_keys=("pair0003",)), 3)
    cfg = train_config(tmp_path, max_steps=6, checkpoint_every=1)
    order = PairOrder(6, cfg.train.seed, 0)
    with_nan = [s for s in range(6) if 3 in {order(s * 2 + i) for i in range(2)}]
    _train(cfg, shards, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["skipped"]] == with_nan and with_nan
    assert rows[-1]["skipped_steps"] == len(with_nan)
    assert all(r["loss"] is None for r in rows if r["skipped"])
    assert all(math.isfinite(r["loss"]) for r in rows if not r["skipped"])
    _assert_checkpoints_finite(tmp_path / "out")


def test_repeated_nans_abort_with_a_clear_message(tmp_path):
    shards = write_shards(tmp_path / "shards", synthetic_pairs(4, nan_keys=tuple(f"pair{i:04d}" for i in range(4))), 4)
    cfg = train_config(tmp_path, max_steps=10, checkpoint_every=1, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(steps 0-2\).*pair0000.*rerun encode"):
        _train(cfg, shards, tmp_path / "out")
    assert len(read_rows(tmp_path / "out" / "metrics.jsonl")) == 3
    _assert_checkpoints_finite(tmp_path / "out")


def test_overflow_without_bad_data_names_the_learning_rate(shards, tmp_path, monkeypatch):
    real = loop.preference_loss

    def overflowing(err_w, *args, **kwargs):
        return real(err_w * float("inf"), *args, **kwargs)

    monkeypatch.setattr(loop, "preference_loss", overflowing)
    cfg = train_config(tmp_path, max_steps=4, max_nonfinite_steps=2)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row.*lower train.learning_rate"):
        _train(cfg, shards, tmp_path / "out")


def test_no_checkpoint_is_written_with_a_non_finite_value(tmp_path):
    from regdpo.train import distributed as D
    from regdpo.train.checkpoint import TrainState, save_checkpoint

    tensors = {"model.w": torch.tensor([1.0, float("nan")]), "optim.w.step": torch.tensor(1.0)}
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint.*model.w"):
        save_checkpoint(tmp_path, TrainState(step=1), tensors, D.DistContext(0, 1, 0, torch.device("cpu")), 2)
    assert not list(tmp_path.iterdir())


def _assert_checkpoints_finite(out: Path) -> None:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts
    for ckpt in ckpts:
        for name, t in load_file(ckpt / "state.safetensors").items():
            assert torch.isfinite(t).all(), (ckpt.name, name)


def test_ema_is_what_final_exports(shards, tmp_path):
    cfg = train_config(tmp_path, max_steps=3, ema_decay=0.5, lr_schedule="cosine", warmup_steps=1)
    _train(cfg, shards, tmp_path / "out")
    final = load_file(tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors")
    state = load_file(tmp_path / "out" / "checkpoints" / "step-000003" / "state.safetensors")
    ema = {k[len("ema."):].replace(".default", ""): v for k, v in state.items() if k.startswith("ema.")}
    raw = {k[len("model."):].replace(".default", ""): v for k, v in state.items() if k.startswith("model.")}
    assert ema and all(torch.equal(final[f"transformer.{k}"], v) for k, v in ema.items())
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    lrs = [r["lr"] for r in read_rows(tmp_path / "out" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5e-4)
