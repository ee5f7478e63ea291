"""Resumable training state: atomic checkpoints, the last K kept, never a non-finite value.

    checkpoints/step-NNNNNN/
        state.json            TrainState: step, segment, lineage, shard set, counters (written last)
        state.safetensors     one process or DDP: every tensor below, by name
        dcp/                  FSDP: the same tensors as a sharded torch.distributed.checkpoint, in
                              safetensors files with JSON metadata (HuggingFaceStorageWriter)

The tensors, by name: `model.<param>` (the trained weights, float32), `optim.<param>.{step,
exp_avg,exp_avg_sq}` (AdamW), `ema.<param>` (train.ema_decay). Nothing is pickled. The data
position is the step (loader.py) and every random draw is derived from the step (rng.py), so
the step restores the loader and every RNG, dropout included; the learning rate is a function
of the step too (optim.py).

Every process writes into `step-NNNNNN.tmp/`; rank 0 writes state.json last and renames the
folder, so a folder named step-NNNNNN is always whole. Before anything is written, every
tensor is checked on every process: a non-finite value aborts the save.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from regdpo.durable import fsync_dir, sync_to_disk
from regdpo.train import distributed as D

FORMAT = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken in this lineage
    segment: int = 0  # shard sets trained on so far - 1 (a run continued over new pairs starts one)
    segment_start: int = 0  # the step at which the current shard set started
    lineage: str = ""  # hash of the settings that shape the trajectory (lineage.py)
    shards: list[dict[str, Any]] = field(default_factory=list)  # the current shard set (loader.PairSource)
    skipped_steps: int = 0  # non-finite steps skipped in all
    nonfinite_run: int = 0  # ... in a row, up to now
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per segment

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainState":
        raw = json.loads((Path(checkpoint) / "state.json").read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{checkpoint}: checkpoint format is not {FORMAT}; start fresh (train.resume: fresh)")
        return cls(**raw)


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.json").is_file())


def latest_checkpoint(root: Path) -> Path | None:
    done = list_checkpoints(root)
    return done[-1] if done else None


def training_tensors(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, ema=None, *,
                     create_optimizer_state: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the training state, by name (the live tensors, sharded under FSDP).

    `create_optimizer_state` first gives parameters without AdamW state zero state to load into."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        out[f"model.{name}"] = p.data if not hasattr(p, "to_local") else p
        state = optimizer.state.get(p)
        if not state and create_optimizer_state:
            state = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if state and key in state:
                out[f"optim.{name}.{key}"] = state[key]
    if ema is not None:
        out.update({f"ema.{name}": t for name, t in ema.shadow.items()})
    return out


def _check_finite(tensors: dict[str, torch.Tensor], device: torch.device, where: str) -> None:
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(D.local_values(t)).all()]
    if not D.all_true(not bad, device):
        names = [n for names in D.gather_json(bad) for n in names]
        raise FloatingPointError(f"refusing to write checkpoint {where}: non-finite values in {len(names)} tensors "
                                 f"(e.g. {names[0] if names else '?'}); no checkpoint holds a non-finite value")


def _sharded(tensors: dict[str, torch.Tensor]) -> bool:
    return any(hasattr(t, "to_local") for t in tensors.values())


def save_checkpoint(root: Path, state: TrainState, tensors: dict[str, torch.Tensor], ctx: D.DistContext,
                    keep: int) -> Path:
    """Write `tensors` and `state` atomically (every process calls this); keep the last `keep`."""
    root = Path(root)
    final = checkpoint_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    _check_finite(tensors, ctx.device, str(final))
    if ctx.is_rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    D.barrier()
    if _sharded(tensors):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    elif ctx.is_rank0:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                  str(tmp / "state.safetensors"))
    D.barrier()
    if ctx.is_rank0:
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **asdict(state)}, indent=1))
        sync_to_disk(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)  # the rename itself
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    D.barrier()
    return final


@torch.no_grad()
def load_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (from `training_tensors(..., create_optimizer_state=True)`) in place."""
    path = Path(path)
    if (path / "dcp").is_dir():
        if not _sharded(tensors):
            raise ValueError(f"{path} was written by an FSDP run: resume it with train.parallelism: fsdp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "dcp")))
        return
    if _sharded(tensors):
        raise ValueError(f"{path} was written without FSDP: resume it with train.parallelism: ddp")
    saved = load_file(str(path / "state.safetensors"))
    missing = sorted(set(tensors) - set(saved))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); it was written for "
                         "another model or LoRA setting: start fresh (train.resume: fresh)")
    for name, t in tensors.items():
        t.copy_(saved[name].to(t.device, t.dtype))
