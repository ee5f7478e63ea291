"""Pair shards: written by regdpo, read back with plain webdataset + safetensors."""

import json

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from regdpo.data.shards import encode_sample, iter_pairs, list_members, read_index, shard_urls, write_pairs


def _write(root, n=5, per_shard=2):
    pairs, samples = {}, []
    for i in range(n):
        t = {"latents_w": torch.randn(4, 3, 2, 2), "latents_l": torch.randn(4, 3, 2, 2), "prompt_embeds": torch.randn(6, 8)}
        key = f"clip{i:04d}"
        pairs[key] = t
        samples.append(encode_sample(key, t, {"caption": f"caption {i}", "clip_id": key}))
    write_pairs(root, {"train": samples}, per_shard)
    return pairs


def test_roundtrip_with_plain_webdataset(tmp_path):
    pairs = _write(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["splits"]["train"]["num_samples"] == 5
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [2, 2, 1]
    assert index["tensors"]["latents_w"] == {"shape": [4, 3, 2, 2], "dtype": "float32"}
    urls = [str(tmp_path / s["path"]) for s in index["splits"]["train"]["shards"]]
    assert sorted(list_members(urls[0])) == ["clip0000.meta.json", "clip0000.pair.safetensors",
                                             "clip0001.meta.json", "clip0001.pair.safetensors"]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        tensors = st_load(sample["pair.safetensors"])
        meta = json.loads(sample["meta.json"])
        assert meta["clip_id"] == sample["__key__"]
        seen[sample["__key__"]] = tensors
    assert seen.keys() == pairs.keys()
    for k in pairs:
        for name in pairs[k]:
            assert torch.equal(seen[k][name], pairs[k][name])
    assert [p["key"] for p in iter_pairs(shard_urls(tmp_path, "train"))] == sorted(pairs)
    assert shard_urls(tmp_path, "heldout") == []


def test_key_with_dot_is_rejected():
    with pytest.raises(ValueError, match="dot"):
        encode_sample("a.b", {"x": torch.zeros(1)}, {})


def test_missing_index_says_run_encode(tmp_path):
    with pytest.raises(FileNotFoundError, match="encode"):
        read_index(tmp_path)


def test_pair_ids_are_checked_before_use_as_a_name():
    from regdpo.data.shards import check_pair_id

    assert check_pair_id("0123456789abcdef") == "0123456789abcdef"
    assert check_pair_id("0123456789abcdef_k2") == "0123456789abcdef_k2"
    for bad in ("../../x", "0123456789abcdef/../a", "0123456789ABCDEF", "0123456789abcdef_k", "", None, "a" * 17):
        with pytest.raises(ValueError, match="not a pair id"):
            check_pair_id(bad, "shards/heldout/pairs-000000.tar")
