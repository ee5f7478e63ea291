"""Pair shards: WebDataset tar files of pre-encoded preference pairs. No pickle anywhere.

One sample per pair, key = the pair id: the clip_id, or clip_id_k<k> for the k-th of several
negatives of a clip (generate.num_negatives > 1):
    <pair_id>.pair.safetensors   latents_w, latents_l (C,F,H,W) + the conditioning tensors
                                 (prompt_embeds (L,D); image-to-video adds image_embeds,
                                 condition_latents)
    <pair_id>.meta.json          caption, clip_id, source, split, negative seed, fingerprints

Readable with plain `webdataset` + `safetensors` (see `iter_pairs` for the whole recipe).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, safetensors.torch and webdataset (which imports torch) are imported
    import torch   # where tensors are made or read, so planning and `regdpo status` stay light

SHARD_PATTERN = "pairs-%06d.tar"


PAIR_ID = re.compile(r"[0-9a-f]{16}(_k[0-9]{1,4})?")  # a clip_id, or clip_id_k<k> (generate.num_negatives > 1)


def check_pair_id(key: object, where: str = "") -> str:
    """`key` if it is a pair id (safe as a file name), else ValueError naming where it came from:
    a shard key or a clip id from data is never used as a path before this check."""
    if not isinstance(key, str) or not PAIR_ID.fullmatch(key):
        raise ValueError(f"{where or 'pair'}: {key!r} is not a pair id (16 hex digits, optionally _k<k>); "
                         "the shard was not written by regdpo encode or was edited: rerun encode")
    return key


def encode_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample dict: tensors as safetensors bytes, meta as JSON bytes."""
    from safetensors.torch import save as st_save

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
    from safetensors.torch import load as st_load

    tensors = st_load(sample["pair.safetensors"])
    return {"key": sample["__key__"], "meta": json.loads(sample["meta.json"]), **tensors}


def conditioning(pair: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioning tensors of a decoded pair or batch: every tensor but the two latents."""
    import torch

    return {k: v for k, v in pair.items() if torch.is_tensor(v) and k not in ("latents_w", "latents_l")}


def shard_number(rel: str) -> int:
    """N of ".../pairs-NNNNNN.tar"."""
    return int(Path(rel).stem.rsplit("-", 1)[1])


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> Path:
    """One tar of samples (dicts with __key__ and byte members, as `encode_sample` makes)."""
    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for sample in samples:
            writer.write(sample)
        writer.close()
    return path


def build_index(entries: Iterable[dict[str, Any]], tensors: dict[str, Any]) -> dict[str, Any]:
    """shards/index.json from one entry per pair ({pair_id, split, shard}): per split, its shards
    (path relative to shards/, num_samples, pair ids) in shard order; tensor shapes/dtypes."""
    by_split: dict[str, dict[str, list[str]]] = {}
    for e in entries:
        by_split.setdefault(e["split"], {}).setdefault(e["shard"], []).append(e["pair_id"])
    return {
        "format": "regdpo-pairs/2",
        "splits": {
            split: {"num_samples": sum(len(p) for p in by.values()),
                    "shards": [{"path": path, "num_samples": len(by[path]), "pairs": sorted(by[path])}
                               for path in sorted(by, key=shard_number)]}
            for split, by in sorted(by_split.items())
        },
        "tensors": tensors,
    }


def write_pairs(root: str | Path, samples_by_split: dict[str, list[dict[str, Any]]], samples_per_shard: int) -> Path:
    """Shards and index.json for a whole set of encoded samples at once (tests, benchmarks, tools;
    the encode stage adds shards incrementally instead)."""
    root = Path(root)
    entries, tensors = [], {}
    for split, samples in samples_by_split.items():
        for n, i in enumerate(range(0, len(samples), samples_per_shard)):
            rel = f"{split}/{SHARD_PATTERN % n}"
            chunk = samples[i:i + samples_per_shard]
            write_shard(root / rel, chunk)
            entries += [{"pair_id": s["__key__"], "split": split, "shard": rel} for s in chunk]
            if not tensors and chunk:
                from safetensors.torch import load as st_load

                tensors = tensor_summary(st_load(chunk[0]["pair.safetensors"]))
    path = root / "index.json"
    path.write_text(json.dumps(build_index(entries, tensors), indent=2))
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
    import webdataset as wds

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
