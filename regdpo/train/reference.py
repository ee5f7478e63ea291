"""The frozen reference of DPO: its errors on a micro-batch's winners and losers, three ways.

`train.reference`:
- adapters-off (LoRA's default): the policy itself with its LoRA adapters switched off, which
  is the base weights exactly; no second model in memory.
- copy (full fine-tuning's default): a frozen copy of the base denoiser, loaded fresh from the
  model (so a resumed run compares with the base, not with its own past); with
  `reference_offload` it waits on the CPU between uses; under FSDP it is sharded like the policy.
- precomputed: before training, one pass over exactly the steps training will run computes
  every pair's reference errors at the (t, ε) training draws for it (rng.py makes those a
  function of the step and the pair's global index), stores them in
  <out>/reference/segment-K.safetensors and frees the model. Training then holds no reference
  model and looks the errors up. A raised max_steps extends the table; nothing is recomputed.

Errors are float32 per pair, never differentiated.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regdpo.losses import per_sample_error
from regdpo.train import distributed as D
from regdpo.durable import sync_to_disk
from regdpo.train.loader import PairSource, Split, make_loader
from regdpo.train.pairs import PairInputs, pair_inputs


def _errors(spec, model, x: PairInputs, precision) -> tuple[torch.Tensor, torch.Tensor]:
    noisy, target, t, cond = x.both()
    with torch.no_grad(), precision():
        err = per_sample_error(spec.predict(model, noisy, t, cond), target)
    m = x.num_pairs
    return err[:m], err[m:]


class AdaptersOffReference:
    holds_model = False  # shares the policy's weights

    def __init__(self, spec, denoiser: torch.nn.Module, precision):
        self.spec, self.denoiser, self.precision = spec, denoiser, precision

    def errors(self, x: PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
        self.spec.set_adapters_enabled(self.denoiser, False)
        try:
            return _errors(self.spec, self.denoiser, x, self.precision)
        finally:
            self.spec.set_adapters_enabled(self.denoiser, True)


class CopyReference:
    holds_model = True

    def __init__(self, spec, ctx: D.DistContext, parallelism: str, compute_dtype: torch.dtype, precision, *,
                 offload: bool = False):
        self.spec, self.ctx, self.precision = spec, ctx, precision
        self.offload = offload and ctx.device.type != "cpu" and parallelism != "fsdp"
        model = spec.load_denoiser(device="cpu" if self.offload else ctx.device).requires_grad_(False).eval()
        self.model = D.parallelize(model, ctx, parallelism, compute_dtype, blocks=spec.blocks(model), trainable=False)

    def errors(self, x: PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offload:
            self.model.to(self.ctx.device)
        try:
            return _errors(self.spec, self.model, x, self.precision)
        finally:
            if self.offload:
                self.model.to("cpu")


class PrecomputedReference:
    holds_model = False

    def __init__(self, table: torch.Tensor, first_step: int):
        self.table, self.first_step = table, first_step  # (steps, batch_size, 2)

    def errors(self, x: PairInputs) -> tuple[torch.Tensor, torch.Tensor]:
        row = x.step - self.first_step
        if not 0 <= row < self.table.shape[0]:
            raise AssertionError(f"no precomputed reference errors for step {x.step}")
        values = self.table[row, x.index.cpu()].to(x.t.device)
        return values[:, 0], values[:, 1]


def table_path(out_dir: Path, segment: int) -> Path:
    return Path(out_dir) / "reference" / f"segment-{segment}.safetensors"


def _read_table(path: Path, meta: dict) -> torch.Tensor | None:
    """The stored table if it was made for this lineage, shard set, segment and batch size."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("regdpo", "{}"))
        if stored != meta:
            return None
        return f.get_tensor("ref_err")


def precompute(spec, cfg, ctx: D.DistContext, source: PairSource, split: Split, *, out_dir: Path, lineage: str,
               segment: int, segment_start: int, end_step: int, parallelism: str, compute_dtype: torch.dtype,
               precision, num_workers: int = 0) -> PrecomputedReference:
    """The reference errors of every pair of steps [segment_start, end_step), computed where the
    stored table does not reach yet. Every process computes its own pairs; the sum over
    processes fills the table (each entry is written by exactly one)."""
    tc = cfg.train
    meta = {"lineage": lineage, "shards": source.digest(), "segment": segment, "segment_start": segment_start,
            "batch_size": tc.batch_size}
    path = table_path(out_dir, segment)
    have = _read_table(path, meta)
    have = torch.zeros(0, tc.batch_size, 2) if have is None else have
    first_missing = segment_start + have.shape[0]
    if first_missing >= end_step:
        return PrecomputedReference(have, segment_start)
    new = torch.zeros(end_step - first_missing, tc.batch_size, 2, dtype=torch.float32, device=ctx.device)
    model = spec.load_denoiser(device=ctx.device).requires_grad_(False).eval()
    model = D.parallelize(model, ctx, parallelism, compute_dtype, blocks=spec.blocks(model), trainable=False)
    loader = make_loader(source, split, seed=tc.seed, segment=segment, segment_start=segment_start,
                         start_step=first_missing, end_step=end_step, num_workers=num_workers)
    for batch in loader:
        x = pair_inputs(spec, batch, tc)
        err_w, err_l = _errors(spec, model, x, precision)
        new[x.step - first_missing, x.index.to(ctx.device)] = torch.stack([err_w, err_l], dim=1)
    del model, loader
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    table = torch.cat([have, D.all_reduce_sum(new).cpu()])
    if ctx.is_rank0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"ref_err": table.contiguous()}, str(tmp), metadata={"regdpo": json.dumps(meta)})
        sync_to_disk(tmp)
        tmp.replace(path)
    D.barrier()
    return PrecomputedReference(table, segment_start)
