"""Pair shards: WebDataset tar files of pre-encoded preference pairs. No pickle anywhere.

One sample per pair, key = clip_id:
    <clip_id>.pair.safetensors   latents_w, latents_l (C,F,H,W) + the conditioning tensors
                                 (prompt_embeds (L,D); image-to-video adds image_embeds,
                                 condition_latents)
    <clip_id>.meta.json          caption, clip_id, source, split, negative seed, fingerprints

Readable with plain `webdataset` + `safetensors` (see `iter_pairs` for the whole recipe).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SHARD_PATTERN = "pairs-%06d.tar"


def encode_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample dict: tensors as safetensors bytes, meta as JSON bytes."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; WebDataset splits keys at dots")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return {
        "__key__": key,
        "pair.safetensors": st_save(tensors),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `encode_sample`: {"key", "meta", **tensors}."""
    tensors = st_load(sample["pair.safetensors"])
    return {"key": sample["__key__"], "meta": json.loads(sample["meta.json"]), **tensors}


def conditioning(pair: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioning tensors of a decoded pair or batch: every tensor but the two latents."""
    return {k: v for k, v in pair.items() if torch.is_tensor(v) and k not in ("latents_w", "latents_l")}


class ShardWriter:
    """Writes samples into numbered shards of at most `samples_per_shard` pairs each."""

    def __init__(self, directory: str | Path, samples_per_shard: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.counts: list[int] = []
        self._tar: wds.TarWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None or self.counts[-1] >= self.samples_per_shard:
            self._next()
        self._tar.write(sample)
        self.counts[-1] += 1

    def _next(self) -> None:
        self.close()
        path = self.directory / (SHARD_PATTERN % len(self.counts))
        self._tar = wds.TarWriter(str(path))
        self.counts.append(0)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [{"path": SHARD_PATTERN % i, "num_samples": n} for i, n in enumerate(self.counts)]


def write_index(shards_root: Path, splits: dict[str, list[dict[str, Any]]], tensors: dict[str, dict[str, Any]],
                fingerprints: dict[str, str]) -> Path:
    """shards/index.json: per split shard list with counts, tensor shapes/dtypes, fingerprints."""
    index = {
        "format": "regdpo-pairs/1",
        "splits": {
            split: {
                "num_samples": sum(s["num_samples"] for s in shards),
                "shards": [{**s, "path": f"{split}/{s['path']}"} for s in shards],
            }
            for split, shards in splits.items()
        },
        "tensors": tensors,
        "fingerprints": fingerprints,
    }
    path = shards_root / "index.json"
    path.write_text(json.dumps(index, indent=2))
    return path


def read_index(shards_root: str | Path) -> dict[str, Any]:
    path = Path(shards_root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the encode stage first")
    return json.loads(path.read_text())


def shard_urls(shards_root: str | Path, split: str) -> list[str]:
    """Absolute shard paths of a split, from index.json (empty list if the split has none)."""
    index = read_index(shards_root)
    entry = index["splits"].get(split)
    if entry is None:
        return []
    return [str(Path(shards_root) / s["path"]) for s in entry["shards"] if s["num_samples"] > 0]


def iter_pairs(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every pair of the given shards in order, decoded (plain webdataset + safetensors)."""
    urls = list(urls)
    if not urls:
        return iter(())
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode_sample)
    return iter(ds)


def list_members(shard: str | Path) -> list[str]:
    """Member names of one shard tar (for checks and debugging)."""
    with tarfile.open(shard) as tf:
        return tf.getnames()


def tensor_summary(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}
