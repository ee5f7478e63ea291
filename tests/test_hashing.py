"""The stable hashes behind unit keys, fingerprints and seeds: pinned, because a key or a seed
that changed with the code would silently redo (or, for seeds, silently mix) work on disk."""

from pathlib import Path

import pytest

from regdpo.hashing import derive_seed, short_hash


def test_short_hash_is_pinned_and_ignores_key_order():
    value = {"b": 1, "a": [1, 2.5, "x"], "p": Path("/w")}
    assert short_hash(value) == "a6ae20ab38bc0cf7"
    assert short_hash({"p": "/w", "a": [1, 2.5, "x"], "b": 1}) == short_hash(value)  # a Path hashes as its str
    assert short_hash({**value, "b": 2}) != short_hash(value)


def test_derive_seed_is_pinned_and_keeps_its_range():
    # generate.clip_seed(0, "abc"), a training pair's seed, ingest's split score: values on disk
    assert derive_seed(0, "abc", bits=31) == 798178146
    assert derive_seed(7, "pair", 3, 1) == 1106503836735178168
    assert derive_seed("split", "abc", bits=48) == 42177643135056
    for bits in (1, 31, 32, 48, 63):
        assert all(0 <= derive_seed(i, "x", bits=bits) < 2**bits for i in range(50))
    assert len({derive_seed(7, "pair", 3, i) for i in range(100)}) == 100
    with pytest.raises(ValueError, match="bits"):
        derive_seed(1, bits=0)
