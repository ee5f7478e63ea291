"""Encode stage: VAE latents of both members + the conditioning, into WebDataset pair shards.

Reads ingest/ (positives, captions, splits) and negatives/; publishes `<workdir>/shards/`:

    <split>/pairs-NNNNNN.tar   WebDataset shards, one sample per pair (regdpo/data/shards.py)
    index.json                 every shard with its sample count and pair ids, tensor shapes

One unit per pair (a clip and one of its negatives), keyed by the clip, its caption and split,
the negative's generate unit, the base model and the latent dtype. A run that adds pairs writes
them into NEW shard files beside the old ones, which are never rewritten; a shard holding a
pair that is no longer wanted is compacted (its other samples copied into a new shard, no
re-encoding) and removed. Training then needs neither the VAE nor the text encoder resident.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from regdpo.config import Config, fingerprint_payload
from regdpo.data.shards import SHARD_PATTERN, build_index, encode_sample, shard_number, write_shard
from regdpo.data.video import read_frames
from regdpo.stages.common import load_clips, load_negatives, resolve_devices
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
    read_index,
    stage_folder,
)


MEMBERS = ("pair.safetensors", "meta.json")


class EncodeWorker(BatchedUnitWorker):
    """The VAE and the condition models on one device."""

    def __init__(self, cfg: Config, workdir: Path, device: str | None):
        import torch

        from regdpo.models import load_model

        self.cfg, self.workdir = cfg, workdir
        model_cfg = cfg.model if device is None else cfg.model.model_copy(update={"device": device})
        self.spec = load_model(model_cfg)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            cfg.encode.latent_dtype]

    def _frames(self, rel: str) -> np.ndarray:
        v = self.cfg.video
        frames = read_frames(self.workdir / rel)
        if frames.shape != (v.num_frames, v.height, v.width, 3):
            raise ValueError(f"{rel}: shape {frames.shape} does not match the clip spec "
                             f"{(v.num_frames, v.height, v.width, 3)}; rerun ingest and generate")
        return frames

    @property
    def batch_size(self) -> int:
        return self.cfg.encode.batch_size

    def process_units(self, units: list[Unit], outs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Latents of every winner and loser in batched VAE calls; each distinct caption embedded once."""
        import torch

        winners = [self._frames(u.spec["clip_path"]) for u in units]
        losers = [self._frames(u.spec["negative_path"]) for u in units]
        with torch.no_grad():
            latents = self.spec.encode_video(np.stack(winners + losers), batch_size=self.cfg.encode.batch_size)
            if self.spec.needs_first_frame:  # the condition includes each clip's own first frame
                conds = [self.spec.encode_condition([u.spec["caption"]], first_frames=w[None, 0],
                                                    num_frames=self.cfg.video.num_frames) for u, w in zip(units, winners)]
            else:
                captions = sorted({u.spec["caption"] for u in units})
                embedded = self.spec.encode_condition(captions)
                by_caption = {c: {k: v[i:i + 1] for k, v in embedded.items()} for i, c in enumerate(captions)}
                conds = [by_caption[u.spec["caption"]] for u in units]
        results = {}
        for i, (u, cond) in enumerate(zip(units, conds)):
            tensors = {"latents_w": latents[i], "latents_l": latents[len(units) + i], **{k: v[0] for k, v in cond.items()}}
            tensors = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
            if bad:
                raise ValueError(f"pair {u.id}: non-finite values in {', '.join(bad)}")
            sample = encode_sample(u.id, tensors, u.spec["meta"])
            for member in MEMBERS:
                (outs[u.key] / member).write_bytes(sample[member])
            results[u.key] = {"pair_id": u.id, "split": u.spec["split"],
                              "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                          for k, v in tensors.items()}}
        return results


class EncodeUnits(UnitStage):
    name = "encode"

    def work_item_size(self, cfg: Config) -> int:
        return cfg.encode.work_item_size

    def public_files(self, result: dict[str, Any]) -> list[str]:
        return [result["shard"]] if "shard" in result else []

    def devices(self, cfg: Config) -> list[str | None]:
        return resolve_devices(cfg.encode.devices, cfg.model.device)

    def open_worker(self, cfg: Config, workdir: Path, device: str | None) -> UnitWorker:
        return EncodeWorker(cfg, workdir, device)

    def plan_units(self, cfg: Config, workdir: Path) -> tuple[list[Unit], dict[str, Any]]:
        clips = load_clips(workdir).set_index("clip_id")
        negatives = load_negatives(workdir)
        generated = {r["id"]: key for key, r in read_index(workdir, "generate").items()}  # clip_id -> unit key
        shaping = {"encode": fingerprint_payload(cfg.encode), "video": fingerprint_payload(cfg.video),
                   "model": model_identity(cfg)}
        units = []
        for neg in negatives.sort_values(["clip_id", "k"]).itertuples():
            if neg.clip_id not in clips.index:
                continue  # a negative of a clip no longer ingested: generate drops it on its next run
            clip = clips.loc[neg.clip_id]
            meta = {"clip_id": neg.clip_id, "caption": clip.caption, "source": clip.source, "split": clip.split,
                    "start_s": float(clip.start_s), "end_s": float(clip.end_s), "negative": neg.negative_id,
                    "negative_k": int(neg.k), "negative_seed": int(neg.seed), "base_model": neg.base_model}
            spec = {"clip_path": f"ingest/clips/{neg.clip_id}.mp4", "negative_path": neg.path,
                    "caption": clip.caption, "split": clip.split, "meta": meta}
            key = content_key("encode", meta, generated.get(neg.clip_id), shaping)
            units.append(Unit(neg.negative_id, key, spec))
        return units, {}

    def assemble(self, cfg: Config, workdir: Path, plan: StagePlan, results: dict[str, dict[str, Any]],
                 new_keys: set[str], old: dict[str, dict[str, Any]], txn: Transaction) -> tuple[set[str], dict[str, Any]]:
        folder = stage_folder(workdir, self.name)
        staging = Staging(workdir, self.name)
        wanted = {u.key for u in plan.units if u.key in results}
        # Old shards: kept whole when every pair in it is still wanted, else compacted.
        by_shard: dict[str, list[str]] = {}
        for key, r in old.items():
            if "shard" in r:
                by_shard.setdefault(r["shard"], []).append(key)
        kept_shards, to_copy = [], []  # to_copy: (key, old shard path) of wanted pairs in compacted shards
        for shard, keys in sorted(by_shard.items()):
            if all(k in wanted and k not in new_keys for k in keys):  # a redone pair retires its shard
                kept_shards.append(shard)
            else:
                to_copy += [(k, shard) for k in keys if k in wanted and k not in new_keys]
                txn.delete(folder / shard)
        # New samples: staged pairs, then pairs rescued from compacted shards, per split in id order.
        pending: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        for key in sorted(new_keys & wanted, key=lambda k: results[k]["pair_id"]):
            unit_dir = staging.unit_dir(key)
            sample = {"__key__": results[key]["pair_id"], **{m: (unit_dir / m).read_bytes() for m in MEMBERS}}
            pending.setdefault(results[key]["split"], []).append((key, sample))
        for key, shard in sorted(to_copy, key=lambda kv: results[kv[0]]["pair_id"]):
            pending.setdefault(results[key]["split"], []).append((key, _read_sample(folder / shard, results[key]["pair_id"])))
        per_shard = cfg.encode.samples_per_shard
        for split, samples in sorted(pending.items()):
            number = 1 + max((shard_number(s) for s in by_shard if s.startswith(f"{split}/")), default=-1)
            for i in range(0, len(samples), per_shard):
                chunk = samples[i:i + per_shard]
                rel = f"{split}/{SHARD_PATTERN % number}"
                write_shard(txn.new_path(folder / rel), [s for _, s in chunk])
                for key, _ in chunk:
                    results[key]["shard"] = rel
                number += 1
        for key in wanted - new_keys:
            if "shard" not in results[key]:
                raise AssertionError(f"pair {results[key]['pair_id']} has no shard")
        index = build_index((results[k] for k in wanted), next((results[k]["tensors"] for k in sorted(wanted)), {}))
        txn.write_bytes(folder / "index.json", (json.dumps(index, indent=2) + "\n").encode())
        return wanted, {split: entry["num_samples"] for split, entry in index["splits"].items()}


def _read_sample(shard: Path, pair_id: str) -> dict[str, bytes]:
    """One sample's members from a published shard, as bytes (copied, never decoded)."""
    with tarfile.open(shard) as tf:
        return {"__key__": pair_id, **{m: tf.extractfile(f"{pair_id}.{m}").read() for m in MEMBERS}}


UNITS = EncodeUnits()
