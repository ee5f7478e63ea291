"""The training loader (regdpo/train/loader.py): one global order split over processes,
micro-batches and workers; fixed-length epochs; resuming without replay; shard-set identity.

Run: .venv/bin/pytest tests/test_loader.py
"""

from __future__ import annotations

import json

import pytest
import torch

from regdpo.train import loader as L
from tests.test_train_fixtures import synthetic_pairs, write_shards

NUM_PAIRS = 10


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = write_shards(tmp_path_factory.mktemp("loader") / "shards", synthetic_pairs(NUM_PAIRS), 3)
    return L.PairSource.from_index(root)


def _steps(source, *, batch_size, world=1, accumulation=1, workers=0, start=0, end=6, segment=0):
    """{step: {global index: key}} over every process of a split."""
    seen: dict[int, dict[int, str]] = {}
    for rank in range(world):
        split = L.Split(batch_size, world, rank, accumulation)
        for batch in L.make_loader(source, split, seed=5, segment=segment, segment_start=0, start_step=start,
                                   end_step=end, num_workers=workers):
            assert len(batch["key"]) == split.micro_batch
            for i, key in zip(batch["index"].tolist(), batch["key"]):
                assert i not in seen.setdefault(batch["step"], {}), "a global index delivered twice"
                seen[batch["step"]][i] = key
    return seen


def test_order_does_not_depend_on_the_split(source):
    """Every step carries the same pairs at the same global indices, however the batch is split
    over processes, accumulation micro-batches and DataLoader workers."""
    want = _steps(source, batch_size=4)
    assert sorted(want) == list(range(6)) and all(sorted(v) == [0, 1, 2, 3] for v in want.values())
    for world, accumulation, workers in [(2, 1, 0), (1, 2, 0), (2, 2, 2), (4, 1, 2), (1, 4, 2)]:
        assert _steps(source, batch_size=4, world=world, accumulation=accumulation, workers=workers) == want


def test_every_epoch_visits_every_pair_once(source):
    stream = _steps(source, batch_size=5, end=6)  # 30 positions = 3 epochs of 10
    flat = [stream[s][i] for s in range(6) for i in range(5)]
    epochs = [flat[k:k + NUM_PAIRS] for k in range(0, 30, NUM_PAIRS)]
    assert all(sorted(e) == sorted(f"pair{i:04d}" for i in range(NUM_PAIRS)) for e in epochs)
    assert epochs[0] != epochs[1]  # each epoch has its own order
    other_segment = _steps(source, batch_size=5, end=2, segment=1)
    assert [other_segment[s][i] for s in range(2) for i in range(5)] != flat[:10]


def test_resuming_at_a_step_reads_only_what_follows(source, monkeypatch):
    whole = _steps(source, batch_size=2, end=7)
    reads = []
    original = L.ShardReader.read
    monkeypatch.setattr(L.ShardReader, "read", lambda self, n: reads.append(n) or original(self, n))
    resumed = _steps(source, batch_size=2, start=4, end=7)
    assert resumed == {s: whole[s] for s in (4, 5, 6)}
    assert len(reads) == 3 * 2  # nothing before step 4 was read: no replay


def test_pairs_decode_with_tensors_and_meta(source):
    batch = next(iter(L.make_loader(source, L.Split(2), seed=0, segment=0, segment_start=0, start_step=0,
                                    end_step=1)))
    assert batch["latents_w"].shape == (2, 16, 3, 4, 4) and batch["prompt_embeds"].shape == (2, 16, 384)
    assert [m["clip_id"] for m in batch["meta"]] == batch["key"] and batch["step"] == 0


def test_shard_set_relation(tmp_path):
    first = synthetic_pairs(6)
    root = write_shards(tmp_path / "a", first, 3)
    old = L.PairSource.from_index(root).identity()
    assert L.shard_set_relation(old, L.PairSource.from_index(root)) == "same"
    index = json.loads((root / "index.json").read_text())["splits"]["train"]["shards"]
    grown = write_shards(tmp_path / "a", synthetic_pairs(9, seed=1)[6:], 3, first_shard=2, existing=index)
    assert L.shard_set_relation(old, L.PairSource.from_index(grown)) == "grew"
    rewritten = write_shards(tmp_path / "b", synthetic_pairs(6, seed=2)[:5], 3)
    assert L.shard_set_relation(old, L.PairSource.from_index(rewritten)) == "changed"


def test_bad_shards_name_the_file(tmp_path):
    root = write_shards(tmp_path / "s", synthetic_pairs(4), 4)
    index = json.loads((root / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["num_samples"] = 5  # index says more than the tar holds
    (root / "index.json").write_text(json.dumps(index))
    reader = L.ShardReader(L.PairSource.from_index(root))
    with pytest.raises(ValueError, match="pairs-000000.tar: holds 4 pairs but shards/index.json says 5"):
        reader.read(0)
    (root / "train" / "pairs-000000.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="pairs-000000.tar: not a readable shard"):
        L.scan_shard(root / "train" / "pairs-000000.tar")
    with pytest.raises(ValueError, match="train split is empty"):
        L.ShardReader(L.PairSource(()))


def test_batch_size_must_split_evenly():
    with pytest.raises(ValueError, match="batch_size \\(6\\) must be divisible"):
        L.Split(6, world_size=4)
    assert L.Split(8, 2, 1, 2).indices(1) == [6, 7]
    assert torch.equal(torch.tensor(L.Split(8, 2, 0, 2).indices(0)), torch.tensor([0, 1]))
