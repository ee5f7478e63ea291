r"""DPO reference model: LoRA + adapter-toggled reference vs full fine-tuning + frozen copy.

Measures, side by side in one run, on a diffusers `WanTransformer3DModel` of configurable size:

1. Memory held by weights for the two strategies of regdpo/train/reference.py:
   - LoRA policy + `AdapterReference` (the reference is the same module with adapters off),
   - full-FT policy + `FrozenCopyReference` (a frozen deep copy),
   counted as parameter + buffer bytes of every distinct tensor the policy and the reference
   hold, plus trainable-parameter bytes, gradient bytes (= trainable) and AdamW state bytes
   (exp_avg + exp_avg_sq: 2x the trainable bytes; also measured after the timed steps).
2. Time per training step (reference forward + policy forward, backward, grad clip, AdamW
   step) for (a) LoRA with the adapter-toggled reference, (b) full FT with the frozen copy,
   and (c) LoRA with winner and loser as one fused 2B batch (what the trainer does) vs two
   separate B-sized forwards each for reference and policy. Warm-up steps are excluded; the
   variants are interleaved step by step (so machine noise hits them alike) and the median of
   --steps steps is reported. torch's thread count is left at its default.

The real project code runs wherever it exists: `regdpo.train.loop._prepare` (requires_grad,
LoRA via the spec, float32 trainables, AdamW), `regdpo.train.loop.train_step` /
`forward_backward` (the fused step), `regdpo.train.reference.make_reference`, and
`regdpo.models.wan.WanT2VSpec.predict` / `add_lora` / `set_adapters_enabled` through a spec
that holds only the transformer (no VAE or text encoder is built: the batch is random latents
and random prompt embeddings). Only the separate-forward variant is written here, mirroring
`forward_backward` line for line; a check reports how far its loss is from the fused one on
the same (t, noise) draw (float rounding only).

Run (from the repository root; defaults: 4 layers, 4 heads x 32 dims, ffn 256, text_dim 384,
latents (16, 3, 8, 8), one pair per batch, 32 text tokens, LoRA rank 16 on to_q/to_k/to_v/
to_out.0, 3 warm-up + 20 timed steps; the other transformer settings are the tiny preset's):

    .venv/bin/python benchmarks/reference_memory.py [--layers N --heads H --head-dim D --frames F --size S --steps K]

Other options: --ffn, --text-dim, --rope-max-seq-len, --batch (pairs), --text-len, --lora-rank, --warmup,
--device (cpu, cuda), --dtype (float32, bfloat16, float16: the base weights cast as from_pretrained
does; LoRA trainables are float32 as in training, full fine-tuning trains in that dtype), --seed, and
--memory-only, which builds the model on the meta device and only counts bytes, so real sizes
cost nothing, e.g. Wan 2.1 14B:

    .venv/bin/python benchmarks/reference_memory.py --memory-only --dtype bfloat16 --layers 40 --heads 40 \
        --head-dim 128 --ffn 13824 --text-dim 4096 --rope-max-seq-len 1024

Output: a table, the ratios, and as the LAST line one JSON object with every figure. A variant
whose training step raises is reported as {"error": ...} in place of its times (full FT with
--dtype bfloat16 does, as of 2026-11-24: see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from regdpo.config import Config, config_from_dict
from regdpo.losses import per_sample_error
from regdpo.models.wan import DTYPES, TINY_TRANSFORMER, WanT2VSpec, _cast_like_from_pretrained
from regdpo.train.loop import _prepare, forward_backward, pair_inputs, pair_loss, train_step
from regdpo.train.reference import make_reference

MiB = 1024**2


class TransformerOnlyWanSpec(WanT2VSpec):
    """A `WanT2VSpec` whose denoiser is built here at a configurable size (`.transformer`):
    `predict`, the noise schedule and the LoRA methods are the real spec's; no other role
    (VAE, text encoder) is ever loaded."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.family = "wan-t2v"
        self.device = device
        self.dtype = dtype
        self.transformer = transformer  # the denoiser passed to predict; the real spec holds none


def build_transformer(args, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cfg = {**TINY_TRANSFORMER, "num_layers": args.layers, "num_attention_heads": args.heads,
           "attention_head_dim": args.head_dim, "ffn_dim": args.ffn, "text_dim": args.text_dim,
           "rope_max_seq_len": args.rope_max_seq_len}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # both strategies start from identical weights
        with torch.device("meta" if args.memory_only else "cpu"):
            transformer = WanTransformer3DModel(**cfg)
    transformer = _cast_like_from_pretrained(transformer, dtype)
    return transformer if args.memory_only else transformer.to(device)


def make_config(args, finetune: str) -> Config:
    return config_from_dict({
        "workdir": "unused", "ingest": {"manifest": "unused.csv"},
        "model": {"preset": "tiny", "dtype": args.dtype},
        "train": {"finetune": finetune, "batch_size": args.batch, "lora": {"rank": args.lora_rank, "alpha": args.lora_rank}},
    }, source="benchmarks/reference_memory.py")


@dataclass
class Setup:
    """One strategy as `regdpo.train.loop.train` builds it: reference first, then _prepare."""

    name: str
    cfg: Config
    spec: TransformerOnlyWanSpec
    reference: Any
    named: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator


def make_setup(args, finetune: str, device: torch.device, dtype: torch.dtype) -> Setup:
    cfg = make_config(args, finetune)
    spec = TransformerOnlyWanSpec(build_transformer(args, device, dtype), device, dtype)
    reference = make_reference(spec.transformer, finetune)
    named, optimizer, scheduler = _prepare(spec, spec.transformer, cfg)
    return Setup(finetune, cfg, spec, reference, named, optimizer, scheduler,
                 torch.Generator().manual_seed(args.seed))


# ---- memory --------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_memory(setup: Setup) -> dict[str, int]:
    """Bytes of every distinct parameter and buffer held by the policy and the reference."""
    modules = [setup.spec.transformer]
    ref_module = getattr(setup.reference, "transformer", None)  # FrozenCopyReference's copy
    if ref_module is not None:
        modules.append(ref_module)
    params = {id(p): p for m in modules for p in m.parameters()}
    buffers = {id(b): b for m in modules for b in m.buffers()}
    trainable = list(setup.named.values())
    trainable_bytes = sum(_nbytes(p) for p in trainable)
    ref_extra = 0 if ref_module is None else sum(_nbytes(t) for t in [*ref_module.parameters(), *ref_module.buffers()])
    return {
        "parameters": sum(p.numel() for p in params.values()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "param_bytes": sum(_nbytes(p) for p in params.values()),
        "buffer_bytes": sum(_nbytes(b) for b in buffers.values()),
        "weight_bytes": sum(_nbytes(t) for t in [*params.values(), *buffers.values()]),
        "reference_extra_bytes": ref_extra,
        "trainable_bytes": trainable_bytes,
        "grad_bytes": trainable_bytes,  # one gradient per trainable parameter, same dtype
        # AdamW keeps exp_avg and exp_avg_sq per trainable parameter, in the parameter's dtype
        # (float32 LoRA weights after _prepare; model.dtype for full fine-tuning).
        "optimizer_state_bytes": 2 * sum(p.numel() * p.element_size() for p in trainable),
    }


def measured_optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int | None:
    """exp_avg + exp_avg_sq actually allocated by AdamW (the per-parameter `step` scalars aside);
    None if the optimizer never stepped."""
    if not optimizer.state:
        return None
    return sum(_nbytes(v) for state in optimizer.state.values() for k, v in state.items()
               if k in ("exp_avg", "exp_avg_sq"))


# ---- the separate-forward variant (mirrors regdpo.train.loop) -------------------------------

def forward_backward_separate(spec, reference, batch, cfg: Config, generator: torch.Generator) -> dict[str, float]:
    """`regdpo.train.loop.forward_backward` with winner and loser as two B-sized forwards
    (for the reference and for the policy) instead of one 2B batch. Same RNG draws, same loss."""
    x = pair_inputs(spec, batch, cfg, generator)
    ref_err_w = per_sample_error(reference.predict(spec, x.noisy_w, x.t, x.cond), x.target_w)
    ref_err_l = per_sample_error(reference.predict(spec, x.noisy_l, x.t, x.cond), x.target_l)
    err_w = per_sample_error(spec.predict(spec.transformer, x.noisy_w, x.t, x.cond), x.target_w)
    err_l = per_sample_error(spec.predict(spec.transformer, x.noisy_l, x.t, x.cond), x.target_l)
    out = pair_loss(cfg, err_w, err_l, ref_err_w, ref_err_l)
    out.loss.backward()
    return out.metrics


def train_step_separate(spec, denoiser, reference, batch, cfg: Config, optimizer, scheduler, params, generator) -> dict[str, float]:
    """`regdpo.train.loop.train_step` around `forward_backward_separate`."""
    optimizer.zero_grad(set_to_none=True)
    metrics = forward_backward_separate(spec, reference, batch, cfg, generator)
    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    return metrics


def fused_vs_separate_loss_diff(setup: Setup, batch) -> tuple[float, float]:
    """|loss_fused - loss_separate| (absolute, relative) on the same (t, noise) draw and the
    same weights; the generator and gradients are left as they were."""
    state = setup.generator.get_state()
    fused = forward_backward(setup.spec, setup.spec.transformer, setup.reference, batch, setup.cfg, setup.generator)["loss"]
    setup.generator.set_state(state)
    separate = forward_backward_separate(setup.spec, setup.reference, batch, setup.cfg, setup.generator)["loss"]
    setup.generator.set_state(state)
    setup.optimizer.zero_grad(set_to_none=True)
    return abs(fused - separate), abs(fused - separate) / max(abs(fused), 1e-30)


# ---- timing -------------------------------------------------------------------------------

def make_batch(args, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, 16, args.frames, args.size, args.size)
    return {"latents_w": torch.randn(shape, generator=g).to(device),
            "latents_l": torch.randn(shape, generator=g).to(device),
            "prompt_embeds": torch.randn(args.batch, args.text_len, args.text_dim, generator=g).to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(variants, batch, args, device: torch.device) -> dict[str, dict[str, Any]]:
    """Interleave the variants step by step; drop the first --warmup rounds. A variant whose
    step raises is recorded as {"error": ...} and dropped (the others go on)."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    peaks: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    errors: dict[str, str] = {}
    for i in range(args.warmup + args.steps):
        for name, setup, step in variants:
            if name in errors:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            _sync(device)
            start = time.perf_counter()
            try:
                step(setup.spec, setup.spec.transformer, setup.reference, batch, setup.cfg, setup.optimizer, setup.scheduler,
                     list(setup.named.values()), setup.generator)
            except Exception as err:  # noqa: BLE001 - reported in the output, not hidden
                errors[name] = f"{type(err).__name__}: {err}"
                continue
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name].append(torch.cuda.max_memory_allocated(device) - before)
    out: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
        if peaks[name]:
            out[name]["peak_step_extra_bytes"] = max(peaks[name])  # activations + transients above the resident state
    return out


# ---- report -------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / MiB:.2f} MiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--rope-max-seq-len", type=int, default=TINY_TRANSFORMER["rope_max_seq_len"],
                   help="rotary table length (>= frames and size / 2); real Wan: 1024")
    p.add_argument("--frames", type=int, default=3, help="latent frames F'")
    p.add_argument("--size", type=int, default=8, help="latent height = width (even: patch 2x2)")
    p.add_argument("--batch", type=int, default=1, help="pairs per step (the fused batch is 2x this)")
    p.add_argument("--text-len", type=int, default=32, help="prompt tokens (model.max_sequence_length)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-only", action="store_true", help="count bytes on the meta device; no timing")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    setups = {name: make_setup(args, name, device, dtype) for name in ("lora", "full")}
    memory = {name: weight_memory(s) for name, s in setups.items()}
    for m in memory.values():
        m["training_state_bytes"] = m["weight_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"]

    timing: dict[str, dict[str, Any]] = {}
    loss_diff = (None, None)
    if not args.memory_only:
        batch = make_batch(args, device)
        loss_diff = fused_vs_separate_loss_diff(setups["lora"], batch)
        variants = [("lora_fused", setups["lora"], train_step),
                    ("lora_separate", setups["lora"], train_step_separate),
                    ("full_fused", setups["full"], train_step)]
        timing = time_steps(variants, batch, args, device)
        for name, s in setups.items():
            memory[name]["optimizer_state_bytes_measured"] = measured_optimizer_state_bytes(s.optimizer)

    lo, fu = memory["lora"], memory["full"]
    ratios = {
        "frozen_copy_over_adapter_weight_bytes": fu["weight_bytes"] / lo["weight_bytes"],
        "frozen_copy_over_adapter_training_state_bytes": fu["training_state_bytes"] / lo["training_state_bytes"],
        "full_over_lora_trainable_bytes": fu["trainable_bytes"] / lo["trainable_bytes"],
    }
    def _ratio(a: str, b: str) -> float | None:
        ok = a in timing and b in timing and "error" not in timing[a] and "error" not in timing[b]
        return timing[a]["median_s"] / timing[b]["median_s"] if ok else None

    if timing:
        ratios["full_over_lora_step_time"] = _ratio("full_fused", "lora_fused")
        ratios["fused_over_separate_step_time"] = _ratio("lora_fused", "lora_separate")

    # ---- print
    tokens = args.frames * (args.size // 2) ** 2
    workload = ("memory only (meta device), " if args.memory_only else
                f"latents (16, {args.frames}, {args.size}, {args.size}) = {tokens} tokens, {args.text_len} text tokens; "
                f"{args.batch} pair(s)/step; {args.device}, ")
    print(f"Wan transformer: {args.layers} layers, {args.heads} heads x {args.head_dim}, ffn {args.ffn}, "
          f"text_dim {args.text_dim}; LoRA rank {args.lora_rank}; {workload}{args.dtype}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print(f"{'weights (policy + reference)':<40}{'LoRA + adapter ref':>22}{'full FT + frozen copy':>24}")
    rows = [("parameters", "parameters", "{:,}".format), ("trainable parameters", "trainable_parameters", "{:,}".format),
            ("parameter + buffer bytes", "weight_bytes", _fmt_bytes),
            ("  of which the reference's own", "reference_extra_bytes", _fmt_bytes),
            ("trainable bytes (= gradient bytes)", "trainable_bytes", _fmt_bytes),
            ("AdamW state bytes (2 x trainable)", "optimizer_state_bytes", _fmt_bytes)]
    if timing:
        rows.append(("AdamW state bytes, measured", "optimizer_state_bytes_measured", _fmt_bytes))
    rows.append(("weights + grads + AdamW state", "training_state_bytes", _fmt_bytes))
    for label, key, fmt in rows:
        print(f"{label:<40}{fmt(lo[key]):>22}{fmt(fu[key]):>24}")
    if timing:
        print()
        print(f"{'step time (s), ' + str(args.steps) + ' steps after ' + str(args.warmup) + ' warm-up':<40}"
              f"{'median':>10}{'min':>10}{'max':>10}")
        labels = {"lora_fused": "(a) LoRA, adapter ref, fused 2B", "lora_separate": "(c) LoRA, adapter ref, 2 x B",
                  "full_fused": "(b) full FT, frozen copy, fused 2B"}
        for name, label in labels.items():
            t = timing[name]
            if "error" in t:
                print(f"{label:<40}  FAILED: {t['error']}")
            else:
                print(f"{label:<40}{t['median_s']:>10.4f}{t['min_s']:>10.4f}{t['max_s']:>10.4f}")
            if "peak_step_extra_bytes" in t:
                print(f"{'  peak memory above resident state':<40}{_fmt_bytes(t['peak_step_extra_bytes']):>10}")
        print(f"fused vs separate loss on the same draw: |diff| = {loss_diff[0]:.3g} (relative {loss_diff[1]:.3g})")
    print()
    print(f"frozen-copy / adapter weight memory = {ratios['frozen_copy_over_adapter_weight_bytes']:.2f}x")
    print(f"frozen-copy / adapter weights + grads + AdamW state = "
          f"{ratios['frozen_copy_over_adapter_training_state_bytes']:.2f}x")
    print(f"full / LoRA trainable bytes = {ratios['full_over_lora_trainable_bytes']:.1f}x")
    if timing:
        for key, label in (("full_over_lora_step_time", "full FT / LoRA step time"),
                           ("fused_over_separate_step_time", "fused / separate step time")):
            value = ratios[key]
            print(f"{label} = " + ("n/a (a variant failed)" if value is None else f"{value:.2f}x"))
    wall = time.perf_counter() - started

    result = {
        "benchmark": "reference_memory",
        "config": {**vars(args), "tokens": tokens},
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "memory": memory,
        "timing": timing,
        "fused_vs_separate_loss_abs_diff": loss_diff[0],
        "fused_vs_separate_loss_rel_diff": loss_diff[1],
        "ratios": ratios,
        "wall_s": wall,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
