r"""A Reg-DPO training step per reference mode vs an SFT step over the same latents.

Side by side in one run, on the same pairs, through the trainer's own code
(`regdpo.train.loop._build` / `train_step`, the loader, the reference modes):

- sft:           objective sft over the 2B latents of B pairs (winners and losers as 2B samples):
                 the policy forward + backward every Reg-DPO step also does;
- adapters-off:  Reg-DPO, LoRA, reference = the policy with adapters disabled (one extra 2B
                 forward without grad);
- precomputed:   Reg-DPO, LoRA, reference errors looked up from the table one pass made before
                 training (its one-off cost is reported per step apart);
- copy:          Reg-DPO, LoRA, reference = a frozen copy of the base denoiser.

Time: the variants are interleaved step by step (machine drift hits them alike), warm-up steps
dropped, median reported. Peak memory: each variant again in a fresh process; on CPU its peak
RSS minus the RSS before any model was built (weights, optimizer state, activations), on CUDA
the peak allocated bytes. With `--wan13b`, the real Wan 2.1 1.3B architecture (random init from
its published config, nothing downloaded, bf16 with float32 LoRA) also runs one SFT step and one
Reg-DPO LoRA step at a small latent size, each in its own process: the peak RSS of each during
its training step (the model built), and the peak above the RSS once built.

    .venv/bin/python benchmarks/train_step.py [--layers 8 --heads 8 --head-dim 64 --ffn 1024 --frames 5 --size 16]
    .venv/bin/python benchmarks/train_step.py --wan13b   # + the 1.3B part (~10 more minutes on 2 CPU cores)

Last line: one JSON object with adapters_off_over_sft_time, precomputed_over_sft_time,
copy_over_sft_time, the same with _peak_mem, and (with --wan13b) wan13b_regdpo_over_sft_peak_rss
and wan13b_regdpo_over_sft_step_mem.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regdpo.config import config_from_dict  # noqa: E402
from regdpo.data.shards import encode_sample  # noqa: E402
from regdpo.models.wan import TINY_TRANSFORMER, WanT2VSpec, _cast_like_from_pretrained  # noqa: E402
from regdpo.train import distributed as D  # noqa: E402
from regdpo.train import loop  # noqa: E402
from regdpo.train.lineage import fresh_state  # noqa: E402
from regdpo.train.loader import PairSource, Split, make_loader  # noqa: E402

VARIANTS = ("sft", "adapters-off", "precomputed", "copy")
GiB = 1024**3
# diffusers' WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/config.json)
WAN21_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


class SizedWanSpec(WanT2VSpec):
    """The real Wan spec (predict, schedule, LoRA) whose denoiser is built at a given size from
    a seed instead of the tiny preset's."""

    def __init__(self, cfg, transformer_cfg: dict[str, Any], seed: int):
        super().__init__(cfg.model, torch.device(cfg.model.device))
        self.transformer_cfg, self.seed = transformer_cfg, seed

    def load_denoiser(self, *, device=None, dtype=None):
        from diffusers import WanTransformer3DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = WanTransformer3DModel(**self.transformer_cfg)
        return _cast_like_from_pretrained(model, dtype or self.dtype).to(device or self.device).eval()

    def fingerprint(self) -> str:
        return "benchmark"


def transformer_cfg(args) -> dict[str, Any]:
    if args.wan13b_worker:
        return WAN21_13B
    return {**TINY_TRANSFORMER, "num_layers": args.layers, "num_attention_heads": args.heads,
            "attention_head_dim": args.head_dim, "ffn_dim": args.ffn, "text_dim": args.text_dim,
            "rope_max_seq_len": max(args.frames, args.size // 2, 32)}


def make_config(args, variant: str, workdir: Path):
    sft = variant == "sft"
    return config_from_dict({
        "workdir": str(workdir), "ingest": {"manifest": "unused.csv"},
        "model": {"preset": "tiny", "dtype": args.dtype, "device": args.device},
        "train": {"objective": "sft" if sft else "reg-dpo", "reference": "auto" if sft else variant,
                  "batch_size": 2 * args.batch if sft else args.batch, "max_steps": args.warmup + args.steps,
                  "loader_workers": 0, "lora": {"rank": args.lora_rank, "alpha": args.lora_rank},
                  "gradient_checkpointing": args.gradient_checkpointing},
    }, source="benchmarks/train_step.py")


def write_pairs(root: Path, args, text_dim: int) -> PairSource:
    """Seeded random pairs as pair shards (the trainer reads them through its loader)."""
    import webdataset as wds

    g = torch.Generator().manual_seed(args.seed)
    shape = (16, args.frames, args.size, args.size)
    (root / "train").mkdir(parents=True)
    with open(root / "train" / "pairs-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        for i in range(args.pairs):
            writer.write(encode_sample(f"p{i:04d}", {
                "latents_w": torch.randn(shape, generator=g), "latents_l": torch.randn(shape, generator=g),
                "prompt_embeds": torch.randn(args.text_len, text_dim, generator=g)}, {"clip_id": f"p{i:04d}"}))
        writer.close()
    (root / "index.json").write_text(json.dumps({"format": "regdpo-pairs/2", "splits": {"train": {
        "num_samples": args.pairs, "shards": [{"path": "train/pairs-000000.tar", "num_samples": args.pairs}]}}}))
    return PairSource.from_index(root)


def sft_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The same pairs as 2B SFT samples: winners then losers."""
    latents = torch.cat([batch["latents_w"], batch["latents_l"]])
    return {**batch, "latents_w": latents, "latents_l": latents, "key": batch["key"] * 2, "meta": batch["meta"] * 2,
            "prompt_embeds": torch.cat([batch["prompt_embeds"]] * 2),
            "index": torch.arange(2 * len(batch["key"]))}


def build(args, variant: str, source: PairSource, workdir: Path, ctx: D.DistContext) -> tuple[loop.Run, float]:
    cfg = make_config(args, variant, workdir / variant)
    spec = SizedWanSpec(cfg, transformer_cfg(args), args.seed)
    tc = cfg.train
    end = args.warmup + args.steps
    start = time.perf_counter()
    run = loop._build(cfg, spec, ctx, source, Split(tc.batch_size), workdir / variant, fresh_state("b", source), "b",
                      end)
    return run, time.perf_counter() - start


def batches(args, source: PairSource, ctx: D.DistContext) -> list[dict[str, Any]]:
    return list(make_loader(source, Split(args.batch), seed=0, segment=0, segment_start=0, start_step=0,
                            end_step=args.warmup + args.steps))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing(args, source: PairSource, workdir: Path) -> dict[str, Any]:
    """All variants in this process, interleaved step by step."""
    ctx = D.init(args.device)
    runs = {v: build(args, v, source, workdir, ctx) for v in VARIANTS}
    data = batches(args, source, ctx)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i, batch in enumerate(data):
        for v in VARIANTS[i % 4:] + VARIANTS[:i % 4]:  # rotate the order: no variant always runs first
            run = runs[v][0]
            micro = [sft_batch(batch) if v == "sft" else batch]
            _sync(ctx.device)
            start = time.perf_counter()
            row = loop.train_step(run, micro)
            _sync(ctx.device)
            run.state.step += 1
            losses[v].append(row["loss"])
            if i >= args.warmup:
                times[v].append(time.perf_counter() - start)
    out = {v: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
           for v, ts in times.items()}
    # precomputed's one pass (load + forward over every step's pairs) minus adapters-off's build
    out["precomputed"]["precompute_s_per_step"] = (runs["precomputed"][1] - runs["adapters-off"][1]) / len(data)
    out["_same_losses"] = max(abs(a - b) / abs(a) for a, b in zip(losses["adapters-off"], losses["precomputed"]))
    return out


def memory_worker(args, variant: str) -> None:
    """One variant alone in this process: print its peak memory above the pre-model baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        text_dim = transformer_cfg(args)["text_dim"]
        source = write_pairs(Path(tmp) / "shards", args, text_dim)
        ctx = D.init(args.device)
        data = batches(args, source, ctx)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        rss_now = _reset_peak_rss()  # the imports' own peak must not count
        run, _ = build(args, variant, source, Path(tmp), ctx)
        built_peak = _peak_rss()
        rss_built = _reset_peak_rss()  # from here: the training step's own peak
        start = time.perf_counter()
        for batch in data[: args.mem_steps]:
            loop.train_step(run, [sft_batch(batch) if variant == "sft" else batch])
            run.state.step += 1
        seconds = (time.perf_counter() - start) / args.mem_steps
        peak = _peak_rss()
        result = {"variant": variant, "rss_before_model": rss_now, "rss_built": rss_built,
                  "build_peak_rss": built_peak, "peak_rss": peak, "extra_bytes": max(peak, built_peak) - rss_now,
                  "step_extra_bytes": peak - rss_built, "step_s": seconds}
        if ctx.device.type == "cuda":
            result["extra_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
        print(json.dumps(result), flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def in_subprocess(args, variant: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-worker", variant, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return {"variant": variant, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--frames", type=int, default=5, help="latent frames F'")
    p.add_argument("--size", type=int, default=16, help="latent height = width (even)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="pairs per step (B); SFT runs 2B samples")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=2, help="steps per memory process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wan13b", action="store_true", help="also the Wan 2.1 1.3B architecture (slow on CPU)")
    p.add_argument("--wan13b-frames", type=int, default=2)
    p.add_argument("--wan13b-size", type=int, default=8)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--wan13b-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        memory_worker(args, args.memory_worker)
        return {}

    started = time.perf_counter()
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("layers", "heads", "head_dim", "ffn", "text_dim", "frames", "size", "text_len", "batch",
                            "pairs", "lora_rank", "steps", "warmup", "mem_steps", "device", "dtype", "seed")]
    if args.gradient_checkpointing:
        passthrough.append("--gradient-checkpointing")
    with tempfile.TemporaryDirectory() as tmp:
        source = write_pairs(Path(tmp) / "shards", args, args.text_dim)
        times = timing(args, source, Path(tmp))
    same_losses = times.pop("_same_losses")
    memory = {v: in_subprocess(args, v, passthrough) for v in VARIANTS}

    wan = {}
    if args.wan13b:
        wan_args = ["--wan13b-worker", "--dtype=bfloat16", f"--frames={args.wan13b_frames}",
                    f"--size={args.wan13b_size}", "--text-len=32", "--batch=1", "--pairs=2", "--mem-steps=1",
                    "--steps=1", "--warmup=0", f"--lora-rank={args.lora_rank}", "--device=cpu"]
        wan = {v: in_subprocess(args, v, wan_args) for v in ("sft", "adapters-off")}

    def ratio(a: str, b: str, table: dict, key: str) -> float | None:
        ok = all(key in table[x] for x in (a, b))
        return table[a][key] / table[b][key] if ok else None

    result: dict[str, Any] = {
        "adapters_off_over_sft_time": ratio("adapters-off", "sft", times, "median_s"),
        "precomputed_over_sft_time": ratio("precomputed", "sft", times, "median_s"),
        "copy_over_sft_time": ratio("copy", "sft", times, "median_s"),
        "adapters_off_over_sft_peak_mem": ratio("adapters-off", "sft", memory, "extra_bytes"),
        "precomputed_over_sft_peak_mem": ratio("precomputed", "sft", memory, "extra_bytes"),
        "copy_over_sft_peak_mem": ratio("copy", "sft", memory, "extra_bytes"),
    }
    if wan:
        result["wan13b_regdpo_over_sft_peak_rss"] = ratio("adapters-off", "sft", wan, "peak_rss")
        result["wan13b_regdpo_over_sft_step_mem"] = ratio("adapters-off", "sft", wan, "step_extra_bytes")

    tokens = args.frames * (args.size // 2) ** 2
    print(f"Wan transformer {args.layers} layers, {args.heads}x{args.head_dim}, ffn {args.ffn}; latents (16, "
          f"{args.frames}, {args.size}, {args.size}) = {tokens} tokens, {args.batch} pair(s) per step (SFT: "
          f"{2 * args.batch} samples); LoRA rank {args.lora_rank}; {args.device} {args.dtype}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<14}{'median s':>10}{'min s':>10}{'max s':>10}{'peak mem above start':>24}")
    for v in VARIANTS:
        t, m = times[v], memory[v]
        mem = f"{m['extra_bytes'] / 2**20:.1f} MiB" if "extra_bytes" in m else m.get("error", "?")
        print(f"{v:<14}{t['median_s']:>10.4f}{t['min_s']:>10.4f}{t['max_s']:>10.4f}{mem:>24}")
    print(f"precomputed: one-off pass {times['precomputed']['precompute_s_per_step']:.4f} s per training step; "
          f"its losses vs adapters-off's: max relative difference {same_losses:.2e}")
    for key, value in result.items():
        print(f"{key} = {value:.3f}" if value is not None else f"{key} = n/a")
    if wan:
        for v, m in wan.items():
            if "error" in m:
                print(f"Wan 2.1 1.3B {v}: FAILED {m['error']}")
            else:
                print(f"Wan 2.1 1.3B {v}: peak RSS in the step {m['peak_rss'] / GiB:.2f} GiB (building: "
                      f"{m['build_peak_rss'] / GiB:.2f} GiB), the step's own {m['step_extra_bytes'] / GiB:.3f} GiB, "
                      f"step {m['step_s']:.1f} s")
    result.update({
        "benchmark": "train_step", "config": vars(args), "tokens": tokens, "times": times, "memory": memory,
        "wan13b": wan, "precomputed_vs_adapters_off_loss_rel_diff": same_losses,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "processor": platform.processor()},
        "wall_s": time.perf_counter() - started,
    })
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
