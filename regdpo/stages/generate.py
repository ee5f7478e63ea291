"""Generate stage: the base model's own video for each clip's condition (the GT-Pair loser).

Reads ingest/clips.parquet; writes negatives/<clip_id>.mp4 and negatives/negatives.parquet
(clip_id, seed, sampler settings, base-model fingerprint, path). Text-to-video conditions on
the caption; image-to-video also on the real clip's first frame. Each clip's seed is derived
from its clip_id, so a negative does not depend on batch composition or order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from regdpo.config import Config
from regdpo.stages.runner import StageContext
from regdpo.data.video import read_frames, write_mp4
from regdpo.stages.common import load_clips, load_spec


def clip_seed(base_seed: int, clip_id: str) -> int:
    """A 31-bit seed from (generate.seed, clip_id): stable across runs and machines."""
    digest = hashlib.sha256(f"{base_seed}:{clip_id}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def build(ctx: StageContext) -> dict[str, Any]:
    cfg, workdir, out = ctx.cfg, ctx.workdir, ctx.out
    clips = load_clips(workdir)
    spec = load_spec(cfg)
    denoiser = spec.load_denoiser()
    gen, video = cfg.generate, cfg.video
    rows = []
    batches = [clips.iloc[i : i + gen.batch_size] for i in range(0, len(clips), gen.batch_size)]
    with tqdm(total=len(clips), desc="generate negatives", unit="clip") as bar:
        for batch in batches:
            seeds = [clip_seed(gen.seed, cid) for cid in batch.clip_id]
            first_frames = None
            if spec.needs_first_frame:
                first_frames = np.stack([read_frames(workdir / "ingest" / "clips" / f"{cid}.mp4")[0] for cid in batch.clip_id])
            videos = spec.generate(
                denoiser, list(batch.caption), seeds,
                num_frames=video.num_frames, height=video.height, width=video.width,
                num_inference_steps=gen.num_inference_steps, guidance_scale=gen.guidance_scale,
                negative_prompt=gen.negative_prompt, first_frames=first_frames, flow_shift=gen.flow_shift,
            )
            for cid, seed, frames in zip(batch.clip_id, seeds, videos):
                write_mp4(out / f"{cid}.mp4", frames, video.fps)
                rows.append({
                    "clip_id": cid, "seed": seed,
                    "num_inference_steps": gen.num_inference_steps, "guidance_scale": gen.guidance_scale,
                    "negative_prompt": gen.negative_prompt, "flow_shift": gen.flow_shift,
                    "base_model": spec.fingerprint(), "path": f"negatives/{cid}.mp4",
                })
            bar.update(len(batch))
    pd.DataFrame(rows).to_parquet(out / "negatives.parquet", index=False)
    return {"num_negatives": len(rows), "base_model": spec.fingerprint()}
