"""The Reg-DPO training loop: train -> train_step -> forward_backward.

    spec = load_model(cfg.model)           # loads nothing: training builds the denoiser alone
    train(cfg, spec, PairSource.from_index(workdir / "shards"), out_dir)

Run it through the pipeline (`regdpo run CONFIG --stage train`: the train stage launches
torchrun itself for train.num_processes > 1) or in every process of your own torchrun
(`torchrun --nproc-per-node N -m regdpo.train.launch CONFIG`). One code path for 1..N processes
(distributed.py): `train.batch_size` pairs per optimizer step over all processes, split over
processes and `train.gradient_accumulation_steps` micro-batches without changing the
trajectory (loader.py, rng.py). Mixed precision: float32 master weights and AdamW state for
everything trained, forward passes in `model.dtype`.

Writes into out_dir (rank 0): metrics.jsonl, checkpoints/step-NNNNNN/, final/ (a diffusers
LoRA, or final/transformer for full fine-tuning; the EMA weights with train.ema_decay), and
reference/ (train.reference: precomputed), tensorboard/. A diverged or non-finite run stops before
anything diverged is checkpointed or exported (divergence.py). Continues from the latest checkpoint
in out_dir (same lineage); over a shard set that grew since, as a new segment (lineage.py).
"""

from __future__ import annotations

import functools
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regdpo.config import Config
from regdpo.losses import per_sample_error, preference_loss, winner_loss
from regdpo.models.base import ADAPTER_NAME
from regdpo.train import distributed as D
from regdpo.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint, training_tensors
from regdpo.train.divergence import TrainingDiverged, check_loss, check_weights, nonfinite_message
from regdpo.train.lineage import lineage_of, resume_state
from regdpo.train.loader import PairSource, Split, make_loader
from regdpo.train.observe import TrainLog
from regdpo.train.optim import EMA, lr_at, make_optimizer, set_lr
from regdpo.train.pairs import nonfinite_pairs, pair_inputs
from regdpo.train.reference import AdaptersOffReference, CopyReference, precompute
from regdpo.train.rng import derive_seed, seed_dropout

# Per-pair diagnostics in the order metrics.jsonl lists them (METHOD.md).
METRICS = ("loss", "dpo_loss", "sft_loss", "s", "dgr", "r", "win_gap", "lose_gap", "implicit_acc",
           "err_w", "err_l", "ref_err_w", "ref_err_l")


@dataclass
class Run:
    """Everything a step needs."""

    cfg: Config
    spec: Any
    ctx: D.DistContext
    model: torch.nn.Module  # what forward passes call: DDP-wrapped, FSDP-sharded, or the denoiser
    denoiser: torch.nn.Module  # the denoiser itself (adapters, state dicts)
    params: dict[str, torch.nn.Parameter]  # the trained weights, float32
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    reference: Any  # None for objective sft
    precision: Any  # () -> context manager for forward passes
    state: TrainState


def train(cfg: Config, spec, source: PairSource | list[str], out_dir: Path, *,
          ctx: D.DistContext | None = None) -> dict[str, Any]:
    """Train until `train.max_steps` steps on the current shard set; returns a small summary."""
    source = source if isinstance(source, PairSource) else PairSource.from_urls(list(source))
    own_ctx = ctx is None
    if ctx is None:
        ctx = D.init(cfg.model.device, need_group=cfg.train.parallelism == "fsdp")
    try:
        return _train(cfg, spec, source, Path(out_dir), ctx)
    finally:
        if own_ctx:
            D.shutdown(ctx)


def _train(cfg: Config, spec, source: PairSource, out_dir: Path, ctx: D.DistContext) -> dict[str, Any]:
    tc = cfg.train
    if spec.device != ctx.device:
        raise ValueError(f"the model spec runs on {spec.device} but this process trains on {ctx.device}: build the "
                         "spec with model.device set to the process's device")
    out_dir.mkdir(parents=True, exist_ok=True)
    lineage = lineage_of(cfg, spec)
    state, latest = resume_state(out_dir / "checkpoints", lineage, source)
    end_step = state.segment_start + tc.max_steps
    if state.step > end_step:
        raise ValueError(f"{latest} is at step {state.step}, past train.max_steps ({tc.max_steps} steps on this shard "
                         f"set, from step {state.segment_start}): raise max_steps or start fresh (train.resume: fresh)")
    split = Split(tc.batch_size, ctx.world_size, ctx.rank, tc.gradient_accumulation_steps)
    run = _build(cfg, spec, ctx, source, split, out_dir, state, lineage, end_step)
    if latest is not None:
        load_checkpoint(latest, training_tensors(run.params, run.optimizer, run.ema, create_optimizer_state=True))
    check_weights(run.params, state.step, tc, starting=True)

    loader = make_loader(source, split, seed=tc.seed, segment=state.segment, segment_start=state.segment_start,
                         start_step=state.step, end_step=end_step, num_workers=tc.loader_workers,
                         pin_memory=ctx.device.type == "cuda")
    log = TrainLog(out_dir, start_step=state.step, end_step=end_step, log_every=tc.log_every, enabled=ctx.is_rank0)
    last: dict[str, Any] = {}
    bad_keys: list[str] = []
    try:
        batches = iter(loader)
        while state.step < end_step:
            micro = [next(batches) for _ in range(tc.gradient_accumulation_steps)]
            last = train_step(run, micro)
            keys = last.pop("_keys")
            # pairs with non-finite data in the current run of skipped steps, for the message
            bad_keys = [*bad_keys, *last.pop("_bad_keys")] if last["skipped"] else []
            log.record(last)
            state.step += 1
            if state.nonfinite_run >= tc.max_nonfinite_steps:
                raise TrainingDiverged(nonfinite_message(state, last, bad_keys, tc))
            checkpoint_due = state.step % tc.checkpoint_every == 0 or state.step == end_step
            check_loss(last, keys, tc)  # every step: the loss is reduced already, no collective
            if checkpoint_due or state.step % tc.log_every == 0:  # weights: cheaply, and never saved diverged
                check_weights(run.params, state.step - 1, tc)
            if checkpoint_due:
                save_checkpoint(out_dir / "checkpoints", state, training_tensors(run.params, run.optimizer, run.ema),
                                ctx, tc.keep_checkpoints)
    finally:
        log.close()
    export_final(run, out_dir / "final")
    return {"steps": state.step, "segment": state.segment, "segment_steps": state.step - state.segment_start,
            "num_pairs": source.num_pairs, "skipped_steps": state.skipped_steps,
            "final_loss": last.get("loss", math.nan) if last else math.nan,
            "resumed_from": latest.name if latest else None, "processes": ctx.world_size,
            "reference": tc.reference_mode if tc.objective != "sft" else None}


def _build(cfg: Config, spec, ctx: D.DistContext, source: PairSource, split: Split, out_dir: Path,
           state: TrainState, lineage: str, end_step: int) -> Run:
    """Reference table first (so its model is gone before the policy exists), then the policy,
    parallelized, then the optimizer over its float32 trained weights."""
    tc = cfg.train
    compute = spec.dtype  # model.dtype: the forward passes' dtype
    precision = functools.partial(D.autocast, ctx.device, compute, tc.parallelism)
    mode = tc.reference_mode if tc.objective != "sft" else None
    reference = None
    if mode == "precomputed":
        reference = precompute(spec, cfg, ctx, source, split, out_dir=out_dir, lineage=lineage, segment=state.segment,
                               segment_start=state.segment_start, end_step=end_step, parallelism=tc.parallelism,
                               compute_dtype=compute, precision=precision, num_workers=tc.loader_workers)

    # Full fine-tuning loads float32 weights: they are the master copy AdamW updates (an lr
    # 1e-5 update is lost in bf16). LoRA keeps the frozen base in model.dtype.
    denoiser = spec.load_denoiser(device="cpu", dtype=torch.float32 if tc.finetune == "full" else compute)
    if tc.finetune == "lora":
        denoiser.requires_grad_(False)
        # peft draws lora_A from the global RNG: seed it (on the CPU, so every process and
        # device starts from the same adapter) without disturbing the caller's stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(tc.seed, "lora-init"))
            spec.add_lora(denoiser, tc.lora)
    else:
        denoiser.requires_grad_(True)
    for p in denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    denoiser.to(ctx.device)
    if tc.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    model = D.parallelize(denoiser, ctx, tc.parallelism, compute, blocks=spec.blocks(denoiser))
    params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}  # after sharding: FSDP swaps them
    if not params:
        raise ValueError("no trainable parameters: check train.finetune and train.lora.target_modules")
    optimizer = make_optimizer(params, tc)
    ema = EMA(params, tc.ema_decay) if tc.ema_decay else None
    if mode == "adapters-off":
        reference = AdaptersOffReference(spec, denoiser, precision)
    elif mode == "copy":
        reference = CopyReference(spec, ctx, tc.parallelism, compute, precision, offload=tc.reference_offload)
    return Run(cfg, spec, ctx, model, denoiser, params, optimizer, ema, reference, precision, state)


def forward_backward(run: Run, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One micro-batch: reference and policy errors of winners and losers (one forward of 2m,
    winners first: same t, ε and conditioning), the loss, backward. Returns per-pair sums."""
    tc = run.cfg.train
    x = pair_inputs(run.spec, batch, tc, with_loser=tc.objective != "sft")
    seed_dropout(tc.seed, x.step, int(x.index[0]))
    if tc.objective == "sft":  # neither the reference nor the loser is run
        with run.precision():
            out = winner_loss(per_sample_error(run.spec.predict(run.model, x.noisy_w, x.t, x.cond), x.target_w))
    else:
        ref_w, ref_l = run.reference.errors(x)
        noisy, target, t, cond = x.both()
        with run.precision():
            err = per_sample_error(run.spec.predict(run.model, noisy, t, cond), target)
        m = x.num_pairs
        out = preference_loss(err[:m], err[m:], ref_w, ref_l, beta=tc.beta, objective=tc.objective,
                              r_mode=tc.r_mode, r_scale=tc.r_scale, r_constant=tc.r_constant)
    # The step's loss is the mean over all batch_size pairs. DDP and FSDP average gradients
    # over processes, hence the factor world_size: the sum over every micro-batch of every
    # process is then exactly the gradient of that mean.
    (out.pair_loss.sum() * (run.ctx.world_size / tc.batch_size)).backward()
    return {k: v.double().sum() for k, v in out.per_pair.items()}


def train_step(run: Run, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Accumulate the micro-batches, reduce metrics over processes, clip, and step AdamW unless
    the loss or the gradient norm is non-finite (then the step is skipped and counted)."""
    tc, ctx, state = run.cfg.train, run.ctx, run.state
    start = time.perf_counter()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    keys: list[str] = []
    for a, batch in enumerate(micro_batches):
        bad += nonfinite_pairs(batch)
        keys += list(batch["key"])
        with D.gradient_sync(run.model, a == len(micro_batches) - 1):
            for k, v in forward_backward(run, batch).items():
                sums[k] = sums[k] + v if k in sums else v
    names = [k for k in METRICS if k in sums]
    totals = D.all_reduce_sum(torch.stack([sums[k] for k in names]))
    metrics = {k: totals[i].item() / tc.batch_size for i, k in enumerate(names)}
    grad_norm = float(D.full_value(torch.nn.utils.clip_grad_norm_(list(run.params.values()), tc.grad_clip)))
    lr = lr_at(state.step - state.segment_start, tc)
    set_lr(run.optimizer, lr)
    finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update()
        state.nonfinite_run = 0
    else:  # no update: the weights, AdamW state and EMA stay as they were
        run.optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        state.nonfinite_run += 1
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {"step": state.step, **metrics, "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
           "skipped_steps": state.skipped_steps, "step_time": seconds, "pairs_per_s": tc.batch_size / seconds,
           "peak_mem_bytes": peak}
    if not finite:
        row["_bad_keys"] = [k for ks in D.gather_json(bad) for k in ks]
    # every pair of the step, for a divergence message (gathered only when it could be needed)
    over = finite and metrics["loss"] > tc.divergence.max_loss
    row["_keys"] = [k for ks in D.gather_json(keys) for k in ks] if over else keys
    return row


def export_final(run: Run, final_dir: Path) -> None:
    """final/: the trained weights (their EMA with train.ema_decay), gathered to rank 0.

    LoRA: diffusers' pytorch_lora_weights.safetensors. Full fine-tuning: final/transformer, a
    diffusers model folder in float32 (the masters: bf16 would round small updates away)."""
    tc, ctx = run.cfg.train, run.ctx
    source = run.ema.shadow if run.ema is not None else {n: p.detach() for n, p in run.params.items()}
    full: dict[str, torch.Tensor] = {}
    for name, t in source.items():  # one tensor at a time: gathering is collective under FSDP
        value = D.full_value(t)
        if ctx.is_rank0:
            full[name] = value.detach().to("cpu", torch.float32)
    if ctx.is_rank0:
        final_dir.mkdir(parents=True, exist_ok=True)
        if tc.finetune == "lora":
            run.spec.save_lora(run.denoiser, final_dir, tensors={k.replace(f".{ADAPTER_NAME}", ""): v for k, v in full.items()})
        else:
            model = run.spec.load_denoiser(device="cpu", dtype=torch.float32)
            missing = set(model.state_dict()) - set(full)
            result = model.load_state_dict(full, strict=False)
            if result.unexpected_keys or any(k in dict(model.named_parameters()) for k in missing):
                raise AssertionError(f"final weights do not match the denoiser: {sorted(missing)[:3]}")
            model.save_pretrained(final_dir / "transformer", safe_serialization=True)
    D.barrier()
