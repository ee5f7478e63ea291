"""The Reg-DPO training loop: train -> train_step -> forward_backward.

Run it through the pipeline (`regdpo run CONFIG --stage train`) or from Python:

    spec = load_model(cfg.model)          # loads nothing; train builds the denoiser alone
    train(cfg, spec, shard_urls(workdir / "shards", "train"), out_dir)

Writes out_dir/metrics.jsonl (one line per step with every METHOD.md diagnostic),
out_dir/checkpoints/step-NNNNNN/ and out_dir/final/ (diffusers-format LoRA, or the full
transformer). Resumes from the latest checkpoint in out_dir.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from regdpo.config import Config
from regdpo.data.shards import conditioning
from regdpo.flow_matching import pair_noise
from regdpo.losses import PreferenceLossOutput, per_sample_error, preference_loss
from regdpo.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from regdpo.train.data import pair_stream
from regdpo.train.reference import make_reference


def is_rank0() -> bool:
    """The one predicate for rank-0-only work (logging, checkpoints, final weights)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_supported(spec) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("multi-process training (torchrun with WORLD_SIZE > 1) is not supported yet; run one process")


@dataclass
class PairInputs:
    """Model inputs and targets of a batch of pairs: winner and loser share t, ε and conditioning."""

    noisy_w: torch.Tensor
    noisy_l: torch.Tensor
    target_w: torch.Tensor
    target_l: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor]


def pair_inputs(spec, batch: dict[str, Any], cfg: Config, generator: torch.Generator) -> PairInputs:
    """Draw ONE (t, ε) per pair and apply it to both members (METHOD.md: shared within a pair)."""
    tc, device = cfg.train, spec.device
    latents_w = batch["latents_w"].to(device, torch.float32)
    latents_l = batch["latents_l"].to(device, torch.float32)
    noise = pair_noise(latents_w, generator)
    t = spec.sample_timesteps(latents_w.shape[0], tc.timesteps, generator).to(device)  # the family's schedule
    noisy_w, target_w = spec.noisy_and_target(latents_w, noise, t)
    noisy_l, target_l = spec.noisy_and_target(latents_l, noise, t)
    cond = {k: v.to(device) for k, v in conditioning(batch).items()}
    return PairInputs(noisy_w, noisy_l, target_w, target_l, t, cond)


def pair_loss(cfg: Config, err_w, err_l, ref_err_w, ref_err_l) -> PreferenceLossOutput:
    """The configured objective on per-sample errors; a non-finite loss is an error."""
    tc = cfg.train
    out = preference_loss(err_w, err_l, ref_err_w, ref_err_l, beta=tc.beta, objective=tc.objective,
                          r_mode=tc.r_mode, r_scale=tc.r_scale, r_constant=tc.r_constant)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"non-finite loss {out.loss.item()} (metrics {out.metrics}); lower train.learning_rate")
    return out


def forward_backward(spec, denoiser, reference, batch: dict[str, Any], cfg: Config, generator: torch.Generator) -> dict[str, float]:
    """Policy and reference errors of winner and loser, the loss, backward."""
    x = pair_inputs(spec, batch, cfg, generator)
    num_pairs = x.t.shape[0]
    # Winner and loser go through the model as one batch of 2B: same t, same ε, same conditioning.
    noisy = torch.cat([x.noisy_w, x.noisy_l])
    target = torch.cat([x.target_w, x.target_l])
    t2 = torch.cat([x.t, x.t])
    cond2 = {k: torch.cat([v, v]) for k, v in x.cond.items()}

    ref_err = per_sample_error(reference.predict(spec, noisy, t2, cond2), target)
    err = per_sample_error(spec.predict(denoiser, noisy, t2, cond2), target)
    out = pair_loss(cfg, err[:num_pairs], err[num_pairs:], ref_err[:num_pairs], ref_err[num_pairs:])
    out.loss.backward()
    return out.metrics


def train_step(spec, denoiser, reference, batch, cfg: Config, optimizer, scheduler, params, generator
               ) -> dict[str, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    metrics = forward_backward(spec, denoiser, reference, batch, cfg, generator)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm at loss {metrics['loss']}; lower train.learning_rate")
    metrics["lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    metrics["grad_norm"] = grad_norm.item()
    metrics["step_time"] = time.perf_counter() - start
    return metrics


def _prepare(spec, denoiser, cfg: Config):
    tc = cfg.train
    if tc.finetune == "lora":
        denoiser.requires_grad_(False)
        spec.add_lora(denoiser, tc.lora)
    else:
        denoiser.requires_grad_(True)
    if tc.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    named = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    if not named:
        raise RuntimeError("no trainable parameters: check train.finetune and train.lora.target_modules")
    if tc.finetune == "lora":
        # LoRA weights in float32 even when the base model is bf16 (stable optimizer updates);
        # peft casts activations to the adapter's dtype. Full fine-tuning trains in model.dtype:
        # use dtype float32 there for float32 weights and optimizer state.
        for p in named.values():
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(named.values(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    warmup = max(tc.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return named, optimizer, scheduler


def train(cfg: Config, spec, urls: list[str], out_dir: Path) -> dict[str, Any]:
    """Train for cfg.train.max_steps steps (resuming from out_dir/checkpoints if present)."""
    _check_supported(spec)
    tc = cfg.train
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    torch.manual_seed(tc.seed)
    denoiser = spec.load_denoiser()
    reference = make_reference(denoiser, tc.finetune)
    named, optimizer, scheduler = _prepare(spec, denoiser, cfg)
    generator = torch.Generator().manual_seed(tc.seed)
    state = TrainState()
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, named, optimizer, scheduler, generator)
    metrics_path = out_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, state.step)

    stream = pair_stream(urls, batch_size=tc.batch_size, seed=tc.seed, skip_batches=state.step)
    last: dict[str, float] = {}
    with metrics_path.open("a") as log, tqdm(total=tc.max_steps, initial=state.step, desc="train", unit="step",
                                             disable=not is_rank0()) as bar:
        while state.step < tc.max_steps:
            batch = next(stream)
            last = train_step(spec, denoiser, reference, batch, cfg, optimizer, scheduler, list(named.values()),
                              generator)
            if is_rank0():
                log.write(json.dumps({"step": state.step, **last}) + "\n")
                log.flush()
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4g}", s=f"{last['s']:.2e}", acc=f"{last['implicit_acc']:.2f}")
            if is_rank0() and (state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps):
                save_checkpoint(ckpt_root, state, named, optimizer, scheduler, generator, tc.keep_checkpoints)
    if is_rank0():
        _save_final(spec, denoiser, cfg, out_dir / "final")
    return {"steps": state.step, "final_loss": last.get("loss", math.nan), "resumed_from": latest.name if latest else None}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps >= `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _save_final(spec, denoiser, cfg: Config, final_dir: Path) -> None:
    final_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.finetune == "lora":
        spec.save_lora(denoiser, final_dir)
    else:
        denoiser.save_pretrained(final_dir / "transformer", safe_serialization=True)
