"""Reg-DPO training on real shards of the tiny model (two sample clips through ingest, generate
and encode): step-0 identities, diagnostics, checkpoints, resume, the final LoRA, and the train
stage holding the denoiser alone.

Run: .venv/bin/pytest tests/test_train.py
"""

import json
import math
import shutil

import pytest
import torch

from regdpo.config import load_config
from regdpo.data.shards import iter_pairs, shard_urls
from regdpo.models import load_model
from regdpo.stages import run, runner
from regdpo.train.checkpoint import TrainState
from regdpo.train.loop import train
from tests.pipeline_helpers import small_config
from tests.test_train_fixtures import read_rows, synthetic_pairs, train_config, write_shards

DIAGNOSTICS = {"loss", "dpo_loss", "sft_loss", "s", "dgr", "r", "win_gap", "lose_gap", "implicit_acc", "lr",
               "grad_norm", "step_time", "pairs_per_s", "peak_mem_bytes"}
TIMING = {"step_time", "pairs_per_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A workdir with ingest, generate and encode done (two real clips, tiny model)."""
    root = tmp_path_factory.mktemp("train")
    cfg = load_config(small_config(root, ingest={"heldout_fraction": 0.0, "min_heldout": 0},
                                   train={"loader_workers": 0}))
    for stage in ("ingest", "generate", "encode"):
        run(cfg, stage)
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("synthetic") / "shards", synthetic_pairs(6), 4)


def test_step0_is_log2_and_every_step_has_every_diagnostic(encoded, tmp_path):
    out = tmp_path / "train"
    train(encoded, load_model(encoded.model), shard_urls(encoded.workdir_path / "shards", "train"), out)
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert DIAGNOSTICS <= r.keys() and r["skipped"] is False
        assert all(math.isfinite(r[k]) for k in DIAGNOSTICS)
    # policy == reference at step 0 (LoRA B = 0): s = 0, DPO loss = log 2, DGR = r = β/2
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["s"] == 0.0 and rows[0]["dgr"] == pytest.approx(500.0) and rows[0]["r"] == pytest.approx(500.0)
    assert rows[0]["win_gap"] == 0.0 and rows[0]["lose_gap"] == 0.0
    # and training moves the policy away from the reference
    assert rows[2]["s"] != 0.0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_resume_with_dropout_reproduces_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    """Stopped after step 3 was logged but before its checkpoint, then rerun: the same numbers,
    LoRA dropout on (every draw is derived from the step, the loader starts at the checkpoint)."""
    import regdpo.train.loop as loop

    cfg = train_config(tmp_path, max_steps=6, checkpoint_every=2, lora={"rank": 4, "alpha": 4, "dropout": 0.5})
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(cfg, load_model(cfg.model), str_urls(shards), straight)

    real_save = loop.save_checkpoint

    def crash_at_4(root, state, *args, **kwargs):
        if state.step == 4:
            raise KeyboardInterrupt
        return real_save(root, state, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", crash_at_4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, load_model(cfg.model), str_urls(shards), interrupted)
    assert [r["step"] for r in read_rows(interrupted / "metrics.jsonl")] == [0, 1, 2, 3]
    summary = train(cfg, load_model(cfg.model), str_urls(shards), interrupted)
    assert summary["resumed_from"] == "step-000002"
    a, b = read_rows(straight / "metrics.jsonl"), read_rows(interrupted / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(6))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in b]


def str_urls(root):
    return [str(p) for p in sorted((root / "train").glob("*.tar"))]


def test_checkpoints_keep_the_last_k_and_ignore_unfinished_ones(shards, tmp_path):
    cfg = train_config(tmp_path, max_steps=5, checkpoint_every=1, keep_checkpoints=2)
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000009.tmp").mkdir(parents=True)  # a save killed half-way
    train(cfg, load_model(cfg.model), str_urls(shards), out)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005", "step-000009.tmp"]
    state = TrainState.read(out / "checkpoints" / "step-000005")
    assert state.step == 5 and state.segment == 0 and len(state.shards) == 2


def test_final_lora_loads_into_diffusers_transformer(encoded, tmp_path):
    from diffusers import WanTransformer3DModel

    from regdpo.models.wan import WanT2VSpec

    out = tmp_path / "train"
    spec = load_model(encoded.model)
    train(encoded, spec, shard_urls(encoded.workdir_path / "shards", "train"), out)
    pair = next(iter_pairs(shard_urls(encoded.workdir_path / "shards", "train")))
    noisy = torch.randn(1, *pair["latents_w"].shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    cond = {"prompt_embeds": pair["prompt_embeds"][None]}
    tuned_denoiser = spec.load_denoiser()
    spec.add_lora(tuned_denoiser, encoded.train.lora)
    spec.load_lora(tuned_denoiser, out / "final")
    with torch.no_grad():
        tuned = spec.predict(tuned_denoiser, noisy, t, cond)

    plain = WanTransformer3DModel(**WanT2VSpec._tiny_transformer_cfg())
    plain.load_state_dict(spec.load_denoiser().state_dict())
    plain.load_lora_adapter(str(out / "final"), prefix="transformer", adapter_name="regdpo", use_safetensors=True)
    with torch.no_grad():
        got = plain(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                    return_dict=False)[0]
    torch.testing.assert_close(got.float(), tuned, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tuned, spec.predict(spec.load_denoiser(), noisy, t, cond))  # it did train


def _copy_workdir(encoded, tmp_path):
    cfg = encoded.model_copy(update={"workdir": str(tmp_path / "w")})
    shutil.copytree(encoded.workdir_path, cfg.workdir_path)
    shutil.rmtree(cfg.workdir_path / "train", ignore_errors=True)
    return cfg


def test_train_stage_resumes_from_partial_after_interruption(encoded, tmp_path, monkeypatch):
    import regdpo.train.loop as loop
    from regdpo.stages import train as train_stage

    cfg = _copy_workdir(encoded, tmp_path)

    def interrupted(*args, **kwargs):  # dies after the last checkpoint, before the final weights
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "export_final", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runner.run_stage(cfg, "train", train_stage.build)
    assert not (cfg.workdir_path / "train").exists()  # nothing half-done is published
    assert (cfg.workdir_path / ".train.partial" / "checkpoints" / "step-000003").is_dir()
    result = runner.run_stage(cfg, "train", train_stage.build)
    assert result.summary["resumed_from"] == "step-000003" and result.summary["start"].startswith("resuming")
    assert (cfg.workdir_path / "train" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_train_stage_builds_only_the_denoiser(encoded, tmp_path, monkeypatch):
    """The shards are pre-encoded so that training never holds the VAE or the text encoder:
    building either during the train stage is an error."""
    import diffusers
    import transformers

    from regdpo.stages import train as train_stage

    def refuse(*args, **kwargs):
        raise AssertionError("the train stage built a VAE or text encoder")

    monkeypatch.setattr(diffusers.AutoencoderKLWan, "__init__", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKLWan, "from_pretrained", refuse)
    for cls in (transformers.BertModel, transformers.UMT5EncoderModel, transformers.CLIPVisionModelWithProjection,
                transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    cfg = _copy_workdir(encoded, tmp_path)
    result = runner.run_stage(cfg, "train", train_stage.build, force=True)
    assert result.summary["steps"] == cfg.train.max_steps


def test_gradient_checkpointing_gives_the_same_steps(shards, tmp_path):
    plain = train_config(tmp_path)
    ckpt = train_config(tmp_path, gradient_checkpointing=True)
    train(plain, load_model(plain.model), str_urls(shards), tmp_path / "a")
    train(ckpt, load_model(ckpt.model), str_urls(shards), tmp_path / "b")
    for ra, rb in zip(read_rows(tmp_path / "a" / "metrics.jsonl"), read_rows(tmp_path / "b" / "metrics.jsonl")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_progress_log_lines_every_n_steps(shards, tmp_path, caplog):
    import logging

    cfg = train_config(tmp_path, max_steps=4, log_every=2)
    with caplog.at_level(logging.INFO, logger="regdpo.train"):
        train(cfg, load_model(cfg.model), str_urls(shards), tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if r.name == "regdpo.train" and r.getMessage().startswith("step")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all(all(f" {k} " in line for k in ("loss", "dgr", "win_gap", "lose_gap")) for line in lines)


def test_tensorboard_event_files_beside_metrics(shards, tmp_path):
    pytest.importorskip("tensorboard")  # the optional extra: pip install -e ".[tensorboard]"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config(tmp_path, max_steps=3)
    train(cfg, load_model(cfg.model), str_urls(shards), tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/dgr", "train/win_gap", "train/pairs_per_s"} <= set(events.Tags()["scalars"])
    rows = read_rows(tmp_path / "out" / "metrics.jsonl")
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
