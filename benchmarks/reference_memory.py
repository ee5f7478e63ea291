r"""Training state of the two DPO reference strategies at the real Wan 2.1 sizes, counted on the meta device.

For each size, the trainer's own `regdpo.train.loop._build` builds the policy, the reference
and AdamW exactly as a training run does, on a denoiser of that architecture created on the
meta device (shapes and dtypes, no storage: nothing is allocated and nothing downloaded):

- (a) LoRA + adapters-off reference: the frozen base in model.dtype (as from_pretrained casts
  it: Wan's `_keep_in_fp32_modules` stay float32), float32 adapters from the spec's `add_lora`
  with regdpo.config.LoraConfig's defaults; the reference is the same module, adapters off;
- (b) full fine-tuning + copy reference: float32 master weights (every parameter trained) and a
  frozen copy of the base in model.dtype, loaded as `CopyReference` loads it.

Counted per strategy: weights of policy + reference (parameters and buffers, every distinct
tensor once, so the adapters-off reference adds nothing), trainable bytes (= gradient bytes:
autograd gives each trained leaf a gradient of its own shape and dtype), AdamW state bytes
(every tensor in the optimizer's state after one `step()` on meta gradients: exp_avg,
exp_avg_sq and the per-tensor step counters), and their sum, the resident training state.
Not counted: activations, autocast's transient low-precision casts, FSDP sharding (divide the
sharded parts by the number of processes), the data loader.

Step time and peak memory per reference mode are measured by benchmarks/train_step.py.

    .venv/bin/python benchmarks/reference_memory.py                          # 1.3B and 14B, bfloat16
    .venv/bin/python benchmarks/reference_memory.py --preset 14b --dtype float16
    .venv/bin/python benchmarks/reference_memory.py --preset custom --layers 2 --heads 2 --head-dim 12 --ffn 32 --text-dim 384

Sizes (diffusers' WanTransformer3DModel configs of Wan 2.1 T2V): 1.3b = 30 layers, 12 heads x
128, ffn 8960; 14b = 40 layers, 40 heads x 128, ffn 13824; both text_dim 4096, rope_max_seq_len
1024. `--preset custom` takes --layers/--heads/--head-dim/--ffn/--text-dim/--rope-max-seq-len
(defaults: the tiny preset's). Output: a table per size and, as the LAST line, one JSON object:
per size (key "1.3b", "14b" or "custom") lora_/full_ weight_bytes, reference_bytes,
trainable_bytes, grad_bytes, adamw_state_bytes, training_state_bytes, parameters,
trainable_parameters, trainable_tensors, and full_over_lora_weights / full_over_lora_training_state.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402

from regdpo.config import Config, config_from_dict  # noqa: E402
from regdpo.models.wan import DTYPES, TINY_TRANSFORMER, WanT2VSpec, _cast_like_from_pretrained  # noqa: E402
from regdpo.train import distributed as D  # noqa: E402
from regdpo.train import loop  # noqa: E402

META = torch.device("meta")
GiB, MiB = 1024**3, 1024**2
_WAN21 = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PRESETS = {
    "1.3b": {**_WAN21, "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960},
    "14b": {**_WAN21, "num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824},
}
SIZE_FLAGS = {"layers": "num_layers", "heads": "num_attention_heads", "head_dim": "attention_head_dim",
              "ffn": "ffn_dim", "text_dim": "text_dim", "rope_max_seq_len": "rope_max_seq_len"}
STRATEGIES = {"lora": "LoRA + adapters-off ref", "full": "full FT + copy ref"}


class MetaWanSpec(WanT2VSpec):
    """The real Wan T2V spec (add_lora, adapters) whose denoiser is a WanTransformer3DModel of
    `transformer_cfg` on the meta device, cast as from_pretrained(torch_dtype=...) casts."""

    def __init__(self, cfg: Config, transformer_cfg: dict[str, Any]):
        super().__init__(cfg.model, META)
        self.transformer_cfg = transformer_cfg

    def load_denoiser(self, *, device=None, dtype=None) -> torch.nn.Module:
        with META:  # `device` is ignored: every tensor stays on meta
            model = WanTransformer3DModel(**self.transformer_cfg)
        return _cast_like_from_pretrained(model, dtype or self.dtype).eval()

    def fingerprint(self) -> str:
        return "meta"


def make_config(finetune: str, dtype: str) -> Config:
    return config_from_dict({"workdir": "unused", "ingest": {"manifest": "unused.csv"},
                             "model": {"preset": "tiny", "dtype": dtype, "device": "cpu"},
                             "train": {"finetune": finetune}}, source="benchmarks/reference_memory.py")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count(finetune: str, transformer_cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Build one strategy through the trainer's `_build` on meta and count its resident state."""
    cfg = make_config(finetune, dtype)
    spec = MetaWanSpec(cfg, transformer_cfg)
    ctx = D.DistContext(rank=0, world_size=1, local_rank=0, device=META)
    with META:  # peft creates the adapters on the default device: keep them on meta too
        # source, split, out_dir, state, lineage, end_step: used by the precomputed mode only
        run = loop._build(cfg, spec, ctx, None, None, None, None, "meta", 1)
    mode = cfg.train.reference_mode
    modules = [run.denoiser]
    if run.reference.holds_model:
        modules.append(run.reference.model)
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    policy = {id(t) for t in [*run.denoiser.parameters(), *run.denoiser.buffers()]}
    params = {id(p): p for m in modules for p in m.parameters()}
    trained = list(run.params.values())
    for p in trained:  # what backward leaves: one gradient per trained leaf, its shape and dtype
        p.grad = torch.empty_like(p)
    # AdamW creates its state lazily, at the first step. The update itself goes through the
    # multi-tensor path: the same state, far fewer (slow, Python-level) meta kernel calls.
    for group in run.optimizer.param_groups:
        group["foreach"] = True
    run.optimizer.step()
    adamw = sum(_nbytes(v) for state in run.optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    out = {
        "reference_mode": mode,
        "parameters": sum(p.numel() for p in params.values()),
        "trainable_parameters": sum(p.numel() for p in trained),
        "trainable_tensors": len(trained),
        "weight_bytes": sum(_nbytes(t) for t in tensors.values()),
        "reference_bytes": sum(_nbytes(t) for i, t in tensors.items() if i not in policy),
        "trainable_bytes": sum(_nbytes(p) for p in trained),
        "grad_bytes": sum(_nbytes(p.grad) for p in trained),
        "adamw_state_bytes": adamw,
        "weight_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
    }
    out["training_state_bytes"] = out["weight_bytes"] + out["grad_bytes"] + out["adamw_state_bytes"]
    return out


def measure(transformer_cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    result: dict[str, Any] = {"transformer": {k: transformer_cfg[k] for k in SIZE_FLAGS.values()}}
    for name in STRATEGIES:
        for key, value in count(name, transformer_cfg, dtype).items():
            result[f"{name}_{key}"] = value
    result["full_over_lora_weights"] = result["full_weight_bytes"] / result["lora_weight_bytes"]
    result["full_over_lora_training_state"] = result["full_training_state_bytes"] / result["lora_training_state_bytes"]
    return result


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def print_table(size: str, r: dict[str, Any], dtype: str) -> None:
    t = r["transformer"]
    lora = make_config("lora", dtype).train.lora
    print(f"Wan 2.1 {size}: {t['num_layers']} layers, {t['num_attention_heads']} heads x {t['attention_head_dim']}, "
          f"ffn {t['ffn_dim']}, text_dim {t['text_dim']}; model.dtype {dtype}; LoRA rank {lora.rank} on "
          f"{', '.join(lora.target_modules)}")
    print(f"{'':<38}" + "".join(f"{label:>26}" for label in STRATEGIES.values()))
    rows = [("parameters (policy + reference)", "parameters", "{:,}".format),
            ("trainable parameters", "trainable_parameters", "{:,}".format),
            ("weights (policy + reference)", "weight_bytes", _fmt),
            ("  of which the reference's own", "reference_bytes", _fmt),
            ("  dtypes", "weight_dtypes", ", ".join),
            ("trainable (= gradient) bytes", "grad_bytes", _fmt),
            ("  trained in", "trainable_dtypes", ", ".join),
            ("AdamW state", "adamw_state_bytes", _fmt),
            ("weights + grads + AdamW state", "training_state_bytes", _fmt)]
    for label, key, fmt in rows:
        print(f"{label:<38}" + "".join(f"{fmt(r[f'{name}_{key}']):>26}" for name in STRATEGIES))
    print(f"full / LoRA: weights {r['full_over_lora_weights']:.2f}x, "
          f"weights + grads + AdamW state {r['full_over_lora_training_state']:.2f}x")
    print()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["1.3b", "14b", "both", "custom"], default="both",
                   help="Wan 2.1 size(s) to count; custom: the size flags below")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="model.dtype")
    for flag, key in SIZE_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None,
                       help=f"--preset custom only (default: the tiny preset's {TINY_TRANSFORMER[key]})")
    args = p.parse_args(argv)
    given = [f"--{f.replace('_', '-')}" for f in SIZE_FLAGS if getattr(args, f) is not None]
    if given and args.preset != "custom":
        p.error(f"{', '.join(given)} set the size of --preset custom; with --preset {args.preset} the size is "
                "the preset's: drop them or add --preset custom")

    started = time.perf_counter()
    if args.preset == "custom":
        sizes = {"custom": {**TINY_TRANSFORMER, **{key: getattr(args, f) for f, key in SIZE_FLAGS.items()
                                                   if getattr(args, f) is not None}}}
    else:
        sizes = {k: v for k, v in PRESETS.items() if args.preset in (k, "both")}
    result: dict[str, Any] = {"benchmark": "reference_memory", "dtype": args.dtype}
    for size, transformer_cfg in sizes.items():
        result[size] = measure(transformer_cfg, args.dtype)
        print_table(size, result[size], args.dtype)
    result["env"] = {"torch": torch.__version__, "machine": platform.machine()}
    result["wall_s"] = time.perf_counter() - started
    print(f"counted in {result['wall_s']:.1f} s (after imports); activations are not counted")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
