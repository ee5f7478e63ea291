"""Encode stage: VAE latents of both members + the conditioning, into WebDataset pair shards.

Reads ingest/ (positives, captions, splits) and negatives/; writes
shards/<split>/pairs-NNNNNN.tar and shards/index.json. Training then needs neither the VAE
nor the text encoder resident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from regdpo.config import Config
from regdpo.stages.runner import StageContext
from regdpo.data.shards import ShardWriter, encode_sample, tensor_summary, write_index
from regdpo.data.video import read_frames
from regdpo.stages.common import load_clips, load_negatives, load_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_frames(frames: np.ndarray, path: Path, cfg: Config) -> np.ndarray:
    v = cfg.video
    expected = (v.num_frames, v.height, v.width, 3)
    if frames.shape != expected:
        raise ValueError(
            f"{path}: shape {frames.shape} does not match the clip spec {expected}; "
            "the video settings changed since it was written: rerun ingest and generate"
        )
    return frames


def encode_pair(spec, cfg: Config, workdir: Path, clip, negative) -> dict[str, torch.Tensor]:
    """Latents of winner and loser plus the conditioning tensors of one pair (batch dim dropped)."""
    pos_path = workdir / "ingest" / "clips" / f"{clip.clip_id}.mp4"
    neg_path = workdir / negative.path
    frames_w = _check_frames(read_frames(pos_path), pos_path, cfg)
    frames_l = _check_frames(read_frames(neg_path), neg_path, cfg)
    with torch.no_grad():
        latents = spec.encode_video(np.stack([frames_w, frames_l]))
        first = frames_w[None, 0] if spec.needs_first_frame else None
        cond = spec.encode_condition([clip.caption], first_frames=first, num_frames=cfg.video.num_frames)
    dtype = DTYPES[cfg.encode.latent_dtype]
    tensors = {"latents_w": latents[0], "latents_l": latents[1]}
    tensors.update({k: v[0] for k, v in cond.items()})
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def build(ctx: StageContext) -> dict[str, Any]:
    cfg, workdir, out = ctx.cfg, ctx.workdir, ctx.out
    clips = load_clips(workdir)
    negatives = load_negatives(workdir).set_index("clip_id")
    missing = sorted(set(clips.clip_id) - set(negatives.index))
    if missing:
        raise ValueError(f"negatives/negatives.parquet lacks {len(missing)} clips (e.g. {missing[0]}): rerun generate")
    spec = load_spec(cfg)
    fingerprints = {"base_model": spec.fingerprint()}
    writers = {split: ShardWriter(out / split, cfg.encode.samples_per_shard) for split in sorted(clips.split.unique())}
    summary_tensors: dict[str, Any] = {}
    for clip in tqdm(list(clips.itertuples()), desc="encode pairs", unit="pair"):
        neg = negatives.loc[clip.clip_id]
        tensors = encode_pair(spec, cfg, workdir, clip, neg)
        summary_tensors = summary_tensors or tensor_summary(tensors)
        meta = {
            "clip_id": clip.clip_id, "caption": clip.caption, "source": clip.source, "split": clip.split,
            "start_s": float(clip.start_s), "end_s": float(clip.end_s),
            "negative_seed": int(neg.seed), "base_model": fingerprints["base_model"],
        }
        writers[clip.split].write(encode_sample(clip.clip_id, tensors, meta))
    for w in writers.values():
        w.close()
    splits = {split: w.shards for split, w in writers.items()}
    write_index(out, splits, summary_tensors, fingerprints)
    return {split: sum(s["num_samples"] for s in shards) for split, shards in splits.items()}
