"""Reg-DPO training on real shards of the tiny model: step-0 identities, diagnostics, resume, final LoRA."""

import json
import math
import shutil

import pytest
import torch

from regdpo.config import load_config
from regdpo.data.shards import iter_pairs, shard_urls
from regdpo.models import load_model
from regdpo.stages import run, runner
from regdpo.train.loop import train
from tests.pipeline_helpers import small_config

DIAGNOSTICS = {"loss", "dpo_loss", "sft_loss", "s", "dgr", "r", "win_gap", "lose_gap", "implicit_acc", "lr",
               "grad_norm", "step_time"}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A workdir with ingest, generate and encode done (two real clips, tiny model)."""
    root = tmp_path_factory.mktemp("train")
    cfg = load_config(small_config(root, ingest={"heldout_fraction": 0.0, "min_heldout": 0}))
    for stage in ("ingest", "generate", "encode"):
        run(cfg, stage)
    return cfg


def _metrics(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_step0_is_log2_and_every_step_has_every_diagnostic(encoded, tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    train(encoded, load_model(encoded.model), shard_urls(encoded.workdir_path / "shards", "train"), out)
    rows = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert DIAGNOSTICS <= r.keys()
        assert all(math.isfinite(r[k]) for k in DIAGNOSTICS)
    # policy == reference at step 0 (LoRA B = 0): s = 0, DPO loss = log 2, DGR = r = β/2
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["s"] == 0.0 and rows[0]["dgr"] == pytest.approx(500.0) and rows[0]["r"] == pytest.approx(500.0)
    assert rows[0]["win_gap"] == 0.0 and rows[0]["lose_gap"] == 0.0
    # and training moves the policy away from the reference
    assert rows[2]["s"] != 0.0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_resume_reproduces_the_uninterrupted_run(encoded, tmp_path):
    urls = shard_urls(encoded.workdir_path / "shards", "train")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    four = encoded.model_copy(update={"train": encoded.train.model_copy(update={"max_steps": 4, "checkpoint_every": 2})})
    two = encoded.model_copy(update={"train": four.train.model_copy(update={"max_steps": 2})})
    train(four, load_model(four.model), urls, straight)
    train(two, load_model(two.model), urls, interrupted)
    # a crash after step 3 was logged but before its checkpoint: the stale line must be replaced
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": -1.0}) + "\n")
    summary = train(four, load_model(four.model), urls, interrupted)
    assert summary["resumed_from"] == "step-000002"
    a, b = _metrics(straight / "metrics.jsonl"), _metrics(interrupted / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for k in DIAGNOSTICS - {"step_time"}:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_final_lora_loads_into_diffusers_transformer(encoded, tmp_path):
    from diffusers import WanTransformer3DModel

    from regdpo.models.wan import WanT2VSpec

    out = tmp_path / "train"
    out.mkdir()
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


def test_train_stage_resumes_from_partial_after_interruption(encoded, tmp_path, monkeypatch):
    import regdpo.train.loop as loop
    from regdpo.stages import train as train_stage

    cfg = encoded.model_copy(update={"workdir": str(tmp_path / "w")})
    shutil.copytree(encoded.workdir_path, cfg.workdir_path)
    shutil.rmtree(cfg.workdir_path / "train", ignore_errors=True)

    def interrupted(*args, **kwargs):  # dies after the last checkpoint, before the final weights
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "_save_final", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runner.run_stage(cfg, "train", train_stage.build)
    assert not (cfg.workdir_path / "train").exists()  # nothing half-done is published
    assert (cfg.workdir_path / ".train.partial" / "checkpoints" / "step-000003").is_dir()
    result = runner.run_stage(cfg, "train", train_stage.build)
    assert result.summary["resumed_from"] == "step-000003"
    assert (cfg.workdir_path / "train" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_steps(encoded, tmp_path):
    urls = shard_urls(encoded.workdir_path / "shards", "train")
    ckpt = encoded.model_copy(update={"train": encoded.train.model_copy(update={"gradient_checkpointing": True})})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train(encoded, load_model(encoded.model), urls, tmp_path / "a")
    train(ckpt, load_model(ckpt.model), urls, tmp_path / "b")
    for ra, rb in zip(_metrics(tmp_path / "a" / "metrics.jsonl"), _metrics(tmp_path / "b" / "metrics.jsonl")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


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
    cfg = encoded.model_copy(update={"workdir": str(tmp_path / "w")})
    shutil.copytree(encoded.workdir_path, cfg.workdir_path)
    shutil.rmtree(cfg.workdir_path / "train", ignore_errors=True)
    result = runner.run_stage(cfg, "train", train_stage.build, force=True)
    assert result.summary["steps"] == cfg.train.max_steps
