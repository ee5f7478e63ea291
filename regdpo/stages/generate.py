"""Generate stage: the base model's own videos for each clip's condition (the GT-Pair losers).

Reads ingest/clips.parquet; publishes `<workdir>/negatives/`:

    <clip_id>.mp4            the negative (with generate.num_negatives K > 1: <clip_id>_k<k>.mp4)
    negatives.parquet        one row per negative: negative_id, clip_id, k, seed, sampler
                             settings, base_model, path, seconds (per-clip generation time)

One unit per clip (its K negatives), keyed by the clip, its caption, the sampler settings, the
base model (model settings + its files) and the seed. Text-to-video conditions on the caption;
image-to-video also on the real clip's first frame. Several clips share each denoiser call
(generate.batch_size videos, classifier-free guidance batched in). A video that comes out
non-finite or constant fails its unit.

Reproducibility. Each negative's seed comes from (generate.seed, clip_id, k) and the sampler
draws each video's starting noise from its own generator, so a negative is a function of its
clip, caption, seed, settings and model. What is equal, exactly:
- Bytes: the same negatives (mp4 files, and the pairs encode makes of them) for the same batch
  composition (generate.batch_size and work_item_size: batches are formed within work items),
  on the same kind of device and software with the same intra-op thread count, whatever the
  number of device processes or machines, which of them did which item, and the load. Device
  processes compute with their caller's thread count (parallel.py) for this reason.
- Within float rounding: the latents across batch compositions and thread counts. Batched
  kernels round differently: on CPU in float32 a negative's latents move by at most 1e-5
  (measured 7.2e-7 at |latent| <= 5.1, the same under a CPU hog on every core), the decoded
  frames by at most one uint8 level before compression. The stored h264 (crf 15) is lossy:
  where a one-level change moves the encoder's decisions, pixels of the mp4 can differ by
  several levels (4 and 8 seen), so negatives from other batch compositions are the same
  samples, not the same bytes. A wrong seed or another clip's caption moves the latents by
  orders of magnitude more (tests/test_pairs_at_scale.py checks both).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from regdpo.config import Config, fingerprint_payload
from regdpo.data.video import read_frames, write_mp4
from regdpo.hashing import derive_seed
from regdpo.stages.common import load_clips, resolve_devices
from regdpo.stages.journal import Transaction
from regdpo.stages.runner import model_identity
from regdpo.stages.units import (
    BatchedUnitWorker,
    StagePlan,
    Staging,
    Unit,
    UnitStage,
    UnitWorker,
    content_key,
    stage_folder,
)


NEGATIVE_SCHEMA = pa.schema([
    ("negative_id", pa.string()), ("clip_id", pa.string()), ("k", pa.int64()), ("seed", pa.int64()),
    ("num_inference_steps", pa.int64()), ("guidance_scale", pa.float64()), ("negative_prompt", pa.string()),
    ("flow_shift", pa.float64()), ("base_model", pa.string()), ("path", pa.string()), ("seconds", pa.float64()),
])


def clip_seed(base_seed: int, clip_id: str, k: int = 0) -> int:
    """A 31-bit seed from (generate.seed, clip_id, k): stable across runs and machines."""
    return derive_seed(base_seed, clip_id, bits=31) if k == 0 else derive_seed(base_seed, clip_id, k, bits=31)


def negative_id(clip_id: str, k: int, num_negatives: int) -> str:
    """The negative's (and its pair's) name: clip_id, or clip_id_k<k> when there are several."""
    return clip_id if num_negatives == 1 else f"{clip_id}_k{k}"


def check_video(frames: np.ndarray, latents_finite: bool) -> str | None:
    """Why a generated video is unusable (None when it is fine)."""
    if not latents_finite:
        return "the sampler produced non-finite values (check generate.guidance_scale and the model weights)"
    if frames.std() == 0:
        return f"every frame is one constant colour ({int(frames.flat[0])}): nothing to learn from"
    return None


class GenerateWorker(BatchedUnitWorker):
    """The denoiser (and, as they are used, the text encoder and VAE) on one device."""

    def __init__(self, cfg: Config, workdir: Path, device: str | None):
        from regdpo.models import load_model

        self.cfg, self.workdir = cfg, workdir
        model_cfg = cfg.model if device is None else cfg.model.model_copy(update={"device": device})
        self.spec = load_model(model_cfg)
        self.denoiser = self.spec.load_denoiser()

    @property
    def batch_size(self) -> int:  # clips per denoiser call: K negatives each
        return max(1, self.cfg.generate.batch_size // self.cfg.generate.num_negatives)

    def process_units(self, units: list[Unit], outs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Sample every negative of `units` in one generate call; write mp4s into `outs`."""
        import torch

        gen, video = self.cfg.generate, self.cfg.video
        prompts, seeds, firsts, owners = [], [], [], []
        for u in units:
            first = read_frames(self.workdir / u.spec["clip_path"])[0] if self.spec.needs_first_frame else None
            for k, seed in enumerate(u.spec["seeds"]):
                prompts.append(u.spec["caption"])
                seeds.append(seed)
                firsts.append(first)
                owners.append((u, k))
        start = time.perf_counter()
        videos, latents = self.spec.generate(
            self.denoiser, prompts, seeds, num_frames=video.num_frames, height=video.height, width=video.width,
            num_inference_steps=gen.num_inference_steps, guidance_scale=gen.guidance_scale,
            negative_prompt=gen.negative_prompt, flow_shift=gen.flow_shift, return_latents=True,
            first_frames=np.stack(firsts) if self.spec.needs_first_frame else None,
        )
        seconds = (time.perf_counter() - start) / len(units)
        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        results: dict[str, dict[str, Any]] = {u.key: {"negatives": [], "files": {}, "seconds": round(seconds, 3)}
                                              for u in units}
        for (u, k), frames, ok in zip(owners, videos, finite):
            result = results[u.key]
            if "error" in result:
                continue
            problem = check_video(frames, ok)
            if problem:  # the same words for every unit with the same problem, so failures group
                result["error"] = problem if len(u.spec["seeds"]) == 1 else f"negative {k}: {problem}"
                continue
            name = u.spec["names"][k]
            write_mp4(outs[u.key] / f"{name}.mp4", frames, video.fps)
            result["files"][f"{name}.mp4"] = f"{name}.mp4"
            result["negatives"].append({"negative_id": name, "clip_id": u.spec["clip_id"], "k": k,
                                        "seed": u.spec["seeds"][k]})
        return results


class GenerateUnits(UnitStage):
    name = "generate"

    def work_item_size(self, cfg: Config) -> int:
        return cfg.generate.work_item_size

    def devices(self, cfg: Config) -> list[str | None]:
        return resolve_devices(cfg.generate.devices, cfg.model.device)

    def open_worker(self, cfg: Config, workdir: Path, device: str | None) -> UnitWorker:
        return GenerateWorker(cfg, workdir, device)

    def plan_units(self, cfg: Config, workdir: Path) -> tuple[list[Unit], dict[str, Any]]:
        gen = cfg.generate
        shaping = {"generate": fingerprint_payload(gen), "video": fingerprint_payload(cfg.video),
                   "model": model_identity(cfg)}
        units = []
        for clip in load_clips(workdir).itertuples():
            ks = range(gen.num_negatives)
            spec = {"clip_id": clip.clip_id, "caption": clip.caption, "clip_path": f"ingest/clips/{clip.clip_id}.mp4",
                    "seeds": [clip_seed(gen.seed, clip.clip_id, k) for k in ks],
                    "names": [negative_id(clip.clip_id, k, gen.num_negatives) for k in ks]}
            units.append(Unit(clip.clip_id, content_key("generate", clip.clip_id, clip.caption, shaping), spec))
        return units, {}

    def assemble(self, cfg: Config, workdir: Path, plan: StagePlan, results: dict[str, dict[str, Any]],
                 new_keys: set[str], old: dict[str, dict[str, Any]], txn: Transaction) -> tuple[set[str], dict[str, Any]]:
        gen = cfg.generate
        folder = stage_folder(workdir, self.name)
        staging = Staging(workdir, self.name)
        base_model = model_identity(cfg)
        rows, kept, names = [], set(), set()
        for unit in plan.units:
            result = results.get(unit.key)
            if result is None:
                continue
            kept.add(unit.key)
            for public, staged in result["files"].items():
                names.add(public)
                if unit.key in new_keys:
                    txn.move(staging.unit_dir(unit.key) / staged, folder / public)
            for neg in result["negatives"]:
                rows.append({**neg, "num_inference_steps": gen.num_inference_steps,
                             "guidance_scale": gen.guidance_scale, "negative_prompt": gen.negative_prompt,
                             "flow_shift": gen.flow_shift, "base_model": base_model,
                             "path": f"{folder.name}/{neg['negative_id']}.mp4", "seconds": result.get("seconds")})
        for old_result in old.values():
            for public in old_result.get("files", {}):
                if public not in names:
                    txn.delete(folder / public)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=NEGATIVE_SCHEMA), buf)
        txn.write_bytes(folder / "negatives.parquet", buf.getvalue())
        secs = [r["seconds"] for r in rows if r["seconds"] is not None]
        return kept, {"num_negatives": len(rows), "num_clips": len(kept), "base_model": base_model,
                      "seconds_per_clip": round(float(np.mean(secs)), 3) if secs else None}


UNITS = GenerateUnits()
