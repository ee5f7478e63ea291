"""The training loader: one global order of pairs, split per process and per DataLoader worker.

Order. The pairs of the train split are numbered 0..N-1 in shard order (shards/index.json).
Epoch e visits all N in a permutation drawn from (train.seed, segment, e); the stream is the
epochs end to end, so every epoch has the same fixed length N and the stream never ends.
Optimizer step s (counted from the start of the current shard set, the "segment") takes stream
positions [s·B, (s+1)·B) for the global batch size B; position s·B + i is the step's pair i,
its *global index*, from which its noise and timestep are drawn (rng.py).

Split. Pair i of a step goes to process i // (B/W) and, inside it, to micro-batch
(i mod B/W) // m (W processes, B/W pairs each, m per micro-batch). A process's DataLoader
workers take turns at chunks of consecutive micro-batches, which DataLoader hands back in order
(see `MicroBatches`). Every process gets exactly B/W pairs every step, so none runs out before another; and
the pairs of a step, their indices and therefore the whole trajectory do not depend on W, on
the accumulation split or on the number of workers.

Position. The loader starts at any step: a shard's member offsets are read from its tar
headers (no data read) and a pair is one seek + read, so resuming at step s starts at stream
position s·B without replaying anything. The position is the training state's step.

Shards are plain WebDataset tars (`<key>.pair.safetensors`, `<key>.meta.json`); nothing is
extracted to disk and no member is unpickled.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from regdpo.data.shards import decode_sample, read_index
from regdpo.hashing import short_hash
from regdpo.train.rng import derive_seed

# WebDataset's split of a member name into sample key and extension (first dot of the basename).
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_MEMBERS = ("pair.safetensors", "meta.json")
LOCK_NAME = ".regdpo.lock"  # regdpo/stages/lock.py's workdir lock (not imported: stages sit above train)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # absolute
    rel: str  # as listed in shards/index.json: part of the shard set's identity
    num_samples: int
    pairs: tuple[str, ...] | None = None  # pair ids, when index.json lists them


@dataclass(frozen=True)
class PairSource:
    """The shards of one split: what the loader reads and what a checkpoint records."""

    shards: tuple[ShardInfo, ...]

    @classmethod
    def from_index(cls, shards_root: str | Path, split: str = "train") -> "PairSource":
        root = Path(shards_root)
        entry = read_index(root)["splits"].get(split) or {"shards": []}
        shards = tuple(
            ShardInfo(str(root / s["path"]), s["path"], int(s["num_samples"]),
                      tuple(s["pairs"]) if s.get("pairs") is not None else None)
            for s in entry["shards"] if int(s["num_samples"]) > 0)
        return cls(shards)

    @classmethod
    def from_urls(cls, urls: list[str]) -> "PairSource":
        """Shards given as paths: counted by reading their tar headers."""
        shards = []
        for url in urls:
            keys = [key for key, _ in scan_shard(url)]
            shards.append(ShardInfo(str(Path(url).resolve()), Path(url).name, len(keys), tuple(keys)))
        return cls(tuple(s for s in shards if s.num_samples > 0))

    @property
    def num_pairs(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def identity(self) -> list[dict[str, Any]]:
        """JSON-able: each shard's path, count and pair ids. Shards are never rewritten in place
        by the encode stage, so an unchanged entry means unchanged pairs."""
        return [{"path": s.rel, "num_samples": s.num_samples, "pairs": list(s.pairs) if s.pairs else None}
                for s in self.shards]

    def digest(self) -> str:
        return short_hash(self.identity())


def shard_set_relation(old: list[dict[str, Any]], new: PairSource) -> str:
    """"same", "grew" (every old shard is still there, unchanged, and there are new ones) or
    "changed" (a shard was removed or rewritten: the old trajectory does not extend to it)."""
    current = {json.dumps(e, sort_keys=True) for e in new.identity()}
    before = {json.dumps(e, sort_keys=True) for e in old}
    if before == current:
        return "same"
    return "grew" if before < current else "changed"


def scan_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (data offset, size)})] in tar order, from the headers alone."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed: members are seekable
            for member in tf:
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    raise ValueError(f"{path}: member {member.name!r} has no WebDataset key.extension name")
                key, ext = m.groups()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: not a readable shard ({err}); rerun the encode stage") from None
    for key, members in samples:
        missing = [m for m in _MEMBERS if m not in members]
        if missing:
            raise ValueError(f"{path}: pair {key!r} lacks {', '.join(missing)}; rerun the encode stage")
    return samples


class ShardReader:
    """Random access to the pairs of a PairSource by number (0..N-1, in shard order).

    Each process/worker keeps its own: shard headers are scanned on first use and a few file
    handles stay open.
    """

    def __init__(self, source: PairSource, max_open: int = 8):
        if source.num_pairs == 0:
            raise ValueError("no training pairs: the train split is empty (check ingest.heldout_fraction and the "
                             "manifest, then rerun encode)")
        self.source = source
        self._starts = [0]
        for s in source.shards:
            self._starts.append(self._starts[-1] + s.num_samples)
        self._scans: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._max_open = max_open

    def _scan(self, j: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        if j not in self._scans:
            shard = self.source.shards[j]
            scan = scan_shard(shard.path)
            if len(scan) != shard.num_samples:
                raise ValueError(f"{shard.path}: holds {len(scan)} pairs but shards/index.json says "
                                 f"{shard.num_samples}: the shard changed after encode; rerun the encode stage")
            self._scans[j] = scan
        return self._scans[j]

    def _file(self, j: int):
        if j in self._files:
            self._files.move_to_end(j)
            return self._files[j]
        if len(self._files) >= self._max_open:
            _, old = self._files.popitem(last=False)
            old.close()
        self._files[j] = open(self.source.shards[j].path, "rb")  # noqa: SIM115 - kept open, closed in close()
        return self._files[j]

    def read(self, number: int) -> dict[str, Any]:
        """Pair `number`, decoded: {"key", "meta", latents_w, latents_l, conditioning...}."""
        j = bisect.bisect_right(self._starts, number) - 1
        key, members = self._scan(j)[number - self._starts[j]]
        f = self._file(j)
        raw: dict[str, Any] = {"__key__": key}
        for ext in _MEMBERS:
            offset, size = members[ext]
            f.seek(offset)
            raw[ext] = f.read(size)
        try:
            return decode_sample(raw)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad shard; say which
            raise ValueError(f"{self.source.shards[j].path}: pair {key!r} cannot be decoded ({err}); "
                             "rerun the encode stage") from None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class PairOrder:
    """Stream position -> pair number: epoch after epoch of seeded permutations of all N pairs."""

    def __init__(self, num_pairs: int, seed: int, segment: int):
        self.num_pairs, self.seed, self.segment = num_pairs, seed, segment
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.segment, epoch))
            self._perms[epoch] = torch.randperm(self.num_pairs, generator=g)
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def __call__(self, position: int) -> int:
        return int(self._perm(position // self.num_pairs)[position % self.num_pairs])


@dataclass(frozen=True)
class Split:
    """Which global indices of a step a process's micro-batches carry."""

    batch_size: int  # global pairs per optimizer step
    world_size: int = 1
    rank: int = 0
    accumulation: int = 1

    def __post_init__(self):
        if self.batch_size % (self.world_size * self.accumulation) != 0:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by the number of processes "
                             f"({self.world_size}) x train.gradient_accumulation_steps ({self.accumulation})")

    @property
    def per_process(self) -> int:
        return self.batch_size // self.world_size

    @property
    def micro_batch(self) -> int:
        return self.per_process // self.accumulation

    def indices(self, micro: int) -> list[int]:
        first = self.rank * self.per_process + micro * self.micro_batch
        return list(range(first, first + self.micro_batch))


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors (equal shapes within a run); keys and meta become lists."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
    for name, value in samples[0].items():
        if torch.is_tensor(value):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class MicroBatches(IterableDataset):
    """This process's micro-batches for global steps [start_step, end_step) (end None: endless),
    in chunks of `chunk` consecutive micro-batches stacked field by field.

    Micro-batch j (counted from start_step) belongs to chunk j // chunk, which DataLoader worker
    (j // chunk) mod num_workers builds. A chunk crosses from a worker in one piece: one shared
    memory transfer per field instead of one per micro-batch, which for small pairs costs more
    than reading them. `Loader` unstacks the chunks, in order.
    """

    def __init__(self, source: PairSource, split: Split, *, seed: int, segment: int, segment_start: int,
                 start_step: int, end_step: int | None, chunk: int = 1):
        self.source, self.split, self.seed = source, split, seed
        self.segment, self.segment_start = segment, segment_start
        self.start_step, self.end_step, self.chunk = start_step, end_step, chunk

    def _micro_batches(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            for micro in range(self.split.accumulation):
                yield step, micro
            step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.source)
        order = PairOrder(self.source.num_pairs, self.seed, self.segment)
        B = self.split.batch_size
        pending: list[dict[str, Any]] = []
        try:
            for j, (step, micro) in enumerate(self._micro_batches()):
                if (j // self.chunk) % num_workers != worker:
                    continue
                indices = self.split.indices(micro)
                base = (step - self.segment_start) * B
                batch = collate_pairs([reader.read(order(base + i)) for i in indices])
                batch["step"] = step
                batch["index"] = torch.tensor(indices, dtype=torch.long)
                pending.append(batch)
                if len(pending) == self.chunk:
                    yield _stack(pending)
                    pending = []
            if pending:
                yield _stack(pending)
        finally:
            reader.close()


def _stack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in batches[0].items():
        out[name] = torch.stack([b[name] for b in batches]) if torch.is_tensor(value) else [b[name] for b in batches]
    return out


def _unstack(chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for k in range(len(chunk["step"])):
        yield {name: value[k] for name, value in chunk.items()}


class Loader:
    """Iterable of micro-batches (see `MicroBatches`), from a DataLoader over chunks."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in self.loader:
            yield from _unstack(chunk)


def _close_inherited_locks(worker_id: int) -> None:
    """DataLoader workers are forked and so share the parent's open files, including the
    workdir lock (a flock, regdpo/stages/lock.py). After a kill -9 of the trainer, orphaned
    workers would hold that lock until they notice (seconds) and a rerun would be refused.
    Closing the worker's copies leaves the parent's lock held (the lock belongs to the open
    file, which the parent still has open)."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return
    for entry in list(fd_dir.iterdir()):
        try:
            if os.readlink(entry).endswith("/" + LOCK_NAME):
                os.close(int(entry.name))
        except OSError:
            continue


CHUNK_BYTES = 64 * 2**20  # per chunk of micro-batches a worker hands over; at most MAX_CHUNK of them
MAX_CHUNK = 16


def make_loader(source: PairSource, split: Split, *, seed: int, segment: int, segment_start: int, start_step: int,
                end_step: int | None, num_workers: int = 0, pin_memory: bool = False) -> Loader:
    """This process's micro-batches, read by `num_workers` DataLoader workers (0: in this process)."""
    chunk = 1
    if num_workers > 0:  # size chunks by one micro-batch's bytes (every pair has the same shapes)
        reader = ShardReader(source)
        pair = reader.read(0)
        reader.close()
        pair_bytes = sum(v.numel() * v.element_size() for v in pair.values() if torch.is_tensor(v))
        chunk = max(1, min(MAX_CHUNK, CHUNK_BYTES // max(1, pair_bytes * split.micro_batch)))
    dataset = MicroBatches(source, split, seed=seed, segment=segment, segment_start=segment_start,
                           start_step=start_step, end_step=end_step, chunk=chunk)
    return Loader(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                             prefetch_factor=2 if num_workers > 0 else None,
                             worker_init_fn=_close_inherited_locks if num_workers > 0 else None))
