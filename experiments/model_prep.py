"""The experiment's small model: the tiny preset, its latents calibrated, its denoiser warmed up.

Both steps write an ordinary diffusers model directory, which the pipeline then uses through
`model.path`, exactly as it would use a real Wan directory.

1. `calibrate`: the tiny preset's VAE is random-init and its latent normalisation is Wan 2.1's
   (latents_mean/std of the real VAE). On the sample clips that leaves latents whose spread
   across clips and positions is ~1e-4 of the noise's variance: real clip and negative are
   then nearly the same point and every denoising error is dominated by noise. Real Wan
   normalises with statistics of its own latents; we do the same, per channel, on the train
   clips (held-out clips are not looked at).
2. `warm_up_directory`: after an SFT run (objective sft, full fine-tuning) on the train clips,
   the same directory with the tuned transformer, so that DPO starts from a model that already
   fits the data (see experiments/README.md for why).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from regdpo.config import Config
from regdpo.data.video import read_frames
from regdpo.models import load_model


def _save(spec, denoiser, out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    spec.pipeline(denoiser).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@torch.no_grad()
def calibrate(cfg: Config, workdir: Path, out: Path) -> dict[str, float]:
    """A model directory = cfg.model with the VAE's latents_mean/std set to the per-channel
    statistics of the train clips' latents. Returns how spread the latents were before/after."""
    spec = load_model(cfg.model)
    vae = spec.latent_model()
    shape = (1, -1, 1, 1, 1)
    mean0 = torch.tensor(vae.config.latents_mean).view(shape)
    std0 = torch.tensor(vae.config.latents_std).view(shape)
    clips = pd.read_parquet(workdir / "ingest" / "clips.parquet")
    train = clips[clips.split == "train"].sort_values("clip_id")
    if train.empty:
        raise ValueError(f"{workdir}: no train clips to calibrate on")
    normed = torch.cat([spec.encode_video(read_frames(workdir / "ingest" / "clips" / f"{cid}.mp4")[None]).cpu()
                        for cid in train.clip_id])
    raw = normed * std0 + mean0  # undo the default normalisation: the VAE's own latents
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    _save(spec, spec.load_denoiser(), out)
    centred = normed - normed.mean(dim=(0, 2, 3, 4), keepdim=True)
    return {"num_clips": len(train), "latent_variance_before": float(centred.pow(2).mean()),
            "latent_variance_after": float(((raw - mean.view(shape)) / std.view(shape)).pow(2).mean())}


def warm_up_directory(cfg: Config, sft_workdir: Path, out: Path) -> Path:
    """cfg.model's directory with its transformer replaced by the one an SFT run saved in
    `sft_workdir`/train/final/transformer (train.finetune: full)."""
    spec = load_model(cfg.model)
    final = sft_workdir / "train" / "final" / "transformer"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{final}: no transformer; the warm-up must train with finetune: full")
    denoiser = type(spec.load_denoiser()).from_pretrained(str(final), local_files_only=True)
    return _save(spec, denoiser, out)


def pair_spread(shards_root: Path) -> dict[str, float]:
    """How different winners and losers are in latent space, and how much the losers vary from
    clip to clip (0 would mean every negative is the same video)."""
    from regdpo.data.shards import iter_pairs, shard_urls

    pairs = list(iter_pairs(shard_urls(shards_root, "train")))
    w = torch.stack([p["latents_w"] for p in pairs]).double()
    lo = torch.stack([p["latents_l"] for p in pairs]).double()
    return {"mse_winner_loser": float((w - lo).pow(2).mean()), "winner_variance": float(w.var()),
            "loser_variance_across_clips": float((lo - lo.mean(dim=0, keepdim=True)).pow(2).mean())}
