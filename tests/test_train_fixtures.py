"""Helpers for the training tests (no tests here): synthetic pair shards for the tiny model and
small configs, so trainer tests need no ingest/generate/encode run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import webdataset as wds

from regdpo.config import Config, config_from_dict
from regdpo.data.shards import encode_sample

LATENT_SHAPE = (16, 3, 4, 4)  # tiny Wan latents of a 9-frame 32x32 clip
TEXT_SHAPE = (16, 384)  # max_sequence_length 16, MiniLM width


def synthetic_pairs(num_pairs: int, seed: int = 0, *, nan_keys: tuple[str, ...] = ()) -> list[dict]:
    """WebDataset samples of pairs with seeded random latents and prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_pairs):
        key = f"pair{i:04d}"
        w = torch.randn(LATENT_SHAPE, generator=g)
        tensors = {"latents_w": w, "latents_l": 0.5 * w + torch.randn(LATENT_SHAPE, generator=g),
                   "prompt_embeds": torch.randn(TEXT_SHAPE, generator=g)}
        if key in nan_keys:
            tensors["latents_w"][0, 0, 0, 0] = float("nan")
        samples.append(encode_sample(key, tensors, {"clip_id": key, "caption": f"caption {i}"}))
    return samples


def write_shards(root: Path, samples: list[dict], per_shard: int, *, first_shard: int = 0,
                 existing: list[dict] | None = None) -> Path:
    """shards/train/pairs-NNNNNN.tar + shards/index.json (format 2); `existing` index entries are
    kept as they are (new shards beside old ones, as the encode stage adds them)."""
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    entries = list(existing or [])
    for n, i in enumerate(range(0, len(samples), per_shard)):
        rel = f"train/pairs-{first_shard + n:06d}.tar"
        chunk = samples[i:i + per_shard]
        with open(root / rel, "wb") as f:
            writer = wds.TarWriter(f)
            for s in chunk:
                writer.write(s)
            writer.close()
        entries.append({"path": rel, "num_samples": len(chunk), "pairs": sorted(s["__key__"] for s in chunk)})
    index = {"format": "regdpo-pairs/2",
             "splits": {"train": {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}}}
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return root


def train_config(workdir: Path, **train) -> Config:
    """The tiny model on CPU with small LoRA settings; `train` overrides train.* fields."""
    raw = {
        "workdir": str(workdir),
        "model": {"preset": "tiny", "device": "cpu", "max_sequence_length": 16},
        "video": {"fps": 8, "num_frames": 9, "height": 32, "width": 32},
        "ingest": {"manifest": str(Path(workdir) / "manifest.csv")},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2,
                  "loader_workers": 0, "lora": {"rank": 4, "alpha": 4}, **train},
    }
    return config_from_dict(raw)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
