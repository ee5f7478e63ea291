"""The training stream: pairs from WebDataset shards, resampled, with a deterministic order.

Shards are resampled with replacement per rank (each rank draws its own shard sequence from
its own seed), so ranks never run out unevenly and the stream is endless; the trainer takes
exactly `max_steps` batches. The order is a pure function of (seed, rank), so resuming at
step k replays the stream and skips k batches: the resumed run sees the same batches.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds

from regdpo.data.shards import decode_sample


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors (equal shapes within a run); keys and meta become lists."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
    for name in samples[0]:
        if not torch.is_tensor(samples[0][name]):
            continue
        batch[name] = torch.stack([s[name] for s in samples])
    return batch


def pair_stream(
    urls: list[str], *, batch_size: int, seed: int, rank: int = 0, shuffle_buffer: int = 64, skip_batches: int = 0
) -> Iterator[dict[str, Any]]:
    """Endless batches of pairs from `urls`; `skip_batches` fast-forwards for exact resume."""
    if not urls:
        raise ValueError("no training shards: the train split is empty (check ingest.heldout_fraction and the manifest)")
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=lambda: rank, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 8), rng=random.Random(seed * 1009 + rank)),
        wds.map(decode_sample),
        wds.batched(batch_size, collation_fn=collate_pairs, partial=False),
    )
    return itertools.islice(iter(pipeline), skip_batches, None)
