"""Everything distributed, in one place: process group, device, mesh, `is_rank0`, `parallelize`.

One code path for 1..N processes. Under torchrun (WORLD_SIZE > 1) `init` joins the process
group (NCCL on GPUs, gloo on CPU) and gives each process its GPU (LOCAL_RANK); as one process
it creates a group only where one is needed (FSDP). `parallelize(model, ctx, cfg)` then wraps
the denoiser:

- ddp: DistributedDataParallel (or the module itself as one process);
- fsdp: FSDP2, `fully_shard` per transformer block and then the root, with a
  MixedPrecisionPolicy (parameters gathered in the compute dtype, gradients reduced in float32;
  the sharded parameters stay float32 for everything trained).

Mixed precision without FSDP is autocast (`autocast`): float32 master weights and optimizer
state, matmuls in the compute dtype.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from regdpo.models import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any = None  # a 1-D DeviceMesh over all processes when a process group exists
    owns_group: bool = False  # `init` created the group, so `shutdown` destroys it

    @property
    def is_rank0(self) -> bool:
        """The one predicate for rank-0-only work (logging, metrics, checkpoint metadata, exports)."""
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_name: str, *, need_group: bool = False) -> DistContext:
    """Join (or, as one process with `need_group`, create) the process group; pick the device.

    `device_name` is model.device: with several processes, "auto"/"cuda" mean this process's
    GPU (LOCAL_RANK); on CPU every process uses the CPU and gloo.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if world > 1:
            if device.index not in (None, local_rank):
                raise ValueError(f"model.device {device_name!r} pins one GPU, but this is one of {world} processes: "
                                 "set model.device: cuda (each process takes its LOCAL_RANK's GPU)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized() and (world > 1 or need_group):
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if world > 1:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process that still needs a group (FSDP): an in-memory store, no ports
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh, owns)
    return DistContext(0, 1, 0, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, ctx: DistContext, parallelism: str, compute_dtype: torch.dtype, *,
                blocks: list[torch.nn.Module] | None = None, trainable: bool = True) -> torch.nn.Module:
    """The module to call for forward passes: FSDP2-sharded in place, DDP-wrapped, or itself.

    `blocks` (the spec's `blocks(model)`) are what FSDP shards one by one; `trainable=False` (a
    frozen reference copy) never needs DDP; with FSDP it is sharded too.
    """
    if parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if not blocks:
            raise ValueError(f"FSDP needs the transformer blocks of {type(model).__name__} to shard: use "
                             "train.parallelism: ddp")
        for block in blocks:
            fully_shard(block, mesh=ctx.mesh, mp_policy=mp)
        fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
        return model
    if parallelism != "ddp":
        raise ValueError(f"train.parallelism {parallelism!r}: use ddp or fsdp")
    if trainable and ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on micro-batches before the last of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def autocast(device: torch.device, compute_dtype: torch.dtype, parallelism: str):
    """Mixed precision for forward passes outside FSDP (whose policy casts parameters itself)."""
    if compute_dtype == torch.float32 or parallelism == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every process."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_reduce_sum(t).item() == 0


# Control messages between processes travel as JSON bytes (never pickle, unlike
# broadcast_object_list / all_gather_object).

def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _to_bytes_tensor(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)


def broadcast_json(obj: Any = None) -> Any:
    """Rank 0's JSON-able `obj` on every process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    device = _comm_device()
    payload = _to_bytes_tensor(obj, device) if dist.get_rank() == 0 else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    return json.loads(bytes(payload.cpu().tolist()).decode())


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in rank order (on every process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    device = _comm_device()
    payload = _to_bytes_tensor(obj, device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.long, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    out = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[: int(n.item())].cpu().tolist()).decode()) for o, n in zip(out, sizes)]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def local_values(t: torch.Tensor) -> torch.Tensor:
    """A parameter's or state tensor's values held by this process (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A scalar or tensor's full value (DTensor gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
