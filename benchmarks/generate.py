r"""Negative generation: several clips per denoiser call vs one clip per call.

Side by side in one run, with the generate stage's own sampler (`WanSpec.generate`, what
`regdpo.stages.generate` calls) on the tiny preset's denoiser, VAE and text encoder:

- **batched**: --batch clips in one `generate` call: each sampling step is ONE denoiser call
  over 2 x batch rows (conditional + unconditional, classifier-free guidance batched in);
- **single**: the same clips one `generate` call each (2 rows per step).

Same prompts, seeds and settings; the variants alternate --repeats times and the medians are
compared as clips per second. A check reports the largest difference between the two
variants' final latents (float rounding only: each clip's noise comes from its own seed).

    .venv/bin/python benchmarks/generate.py [--batch 4 --steps 8 --size 64 --frames 9 --guidance 5 --repeats 5]

Last line: one JSON object with `batched_over_single` and every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regdpo.config import ModelConfig  # noqa: E402
from regdpo.models import load_model  # noqa: E402

CAPTIONS = [
    "A cartoon landscape with pink clouds, rolling green hills and a tall fir tree.",
    "An animated hooded traveler walks toward the camera through a snowy blizzard.",
    "A man in a bowler hat walks along a busy sidewalk in an old black and white film.",
    "A small airplane taxis across a grass field on a sunny day.",
    "Pancakes sizzle in a pan in a home kitchen.",
    "A dog lies on a rug in a living room.",
    "A big white rabbit stretches in a sunny forest clearing.",
    "A tall fir tree sways in the wind on a hill.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="clips per generate call in the batched variant")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps")
    ap.add_argument("--size", type=int, default=64, help="height and width (multiple of 16)")
    ap.add_argument("--frames", type=int, default=9, help="frames (4k+1)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    spec = load_model(ModelConfig(preset="tiny", device=args.device, max_sequence_length=32))
    denoiser = spec.load_denoiser()
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    seeds = [1000 + i for i in range(args.batch)]
    settings = dict(num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, negative_prompt="blurry, static", return_latents=True)
    spec.generate(denoiser, prompts[:1], seeds[:1], **settings)  # warm-up: roles loaded, kernels ready

    times: dict[str, list[float]] = {"batched": [], "single": []}
    latents: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, latents["batched"] = spec.generate(denoiser, prompts, seeds, **settings)
        times["batched"].append(time.perf_counter() - start)
        start = time.perf_counter()
        latents["single"] = torch.cat([spec.generate(denoiser, [p], [s], **settings)[1] for p, s in zip(prompts, seeds)])
        times["single"].append(time.perf_counter() - start)

    batched_s, single_s = statistics.median(times["batched"]), statistics.median(times["single"])
    figures = {
        "clips": args.batch, "steps": args.steps, "size": args.size, "frames": args.frames,
        "guidance_scale": args.guidance, "repeats": args.repeats, "device": args.device,
        "batched_s_median": round(batched_s, 4), "single_s_median": round(single_s, 4),
        "batched_clips_per_s": round(args.batch / batched_s, 3), "single_clips_per_s": round(args.batch / single_s, 3),
        "batched_over_single": round(single_s / batched_s, 3),
        "max_latent_diff": float((latents["batched"] - latents["single"]).abs().max()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
    }
    print(f"{'variant':<8} {'median s':>9} {'clips/s':>8}")
    print(f"{'batched':<8} {batched_s:9.3f} {figures['batched_clips_per_s']:8.2f}   ({args.batch} clips per call)")
    print(f"{'single':<8} {single_s:9.3f} {figures['single_clips_per_s']:8.2f}   (1 clip per call)")
    print(f"batched_over_single = {figures['batched_over_single']}; max latent difference {figures['max_latent_diff']:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
