r"""Pairs per second the training loader delivers vs pairs per second a training step consumes.

Side by side in one run, on the same shards: (1) the trainer's loader (`regdpo.train.loader`,
random access into the tar shards, decoding, collation) alone, with 0 and with --workers
DataLoader workers, over --loader-steps steps; (2) the demo model's training step (the tiny Wan
preset at configs/demo.yaml's sizes and batch, Reg-DPO with LoRA, through `loop.train_step`)
over --train-steps steps, median. The loader must outpace training by a wide margin, so data
never stalls a step: `loader_over_step` = loader pairs/s (with workers) / training pairs/s.

    .venv/bin/python benchmarks/loader.py                      # synthetic pairs at the demo's shapes
    .venv/bin/python benchmarks/loader.py --shards runs/demo/shards   # real shards (after make demo)

Last line: one JSON object with loader_over_step and every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regdpo.config import load_config  # noqa: E402
from regdpo.data.shards import encode_sample  # noqa: E402
from regdpo.models import load_model  # noqa: E402
from regdpo.train import distributed as D  # noqa: E402
from regdpo.train import loop  # noqa: E402
from regdpo.train.lineage import fresh_state  # noqa: E402
from regdpo.train.loader import PairSource, Split, make_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synthetic_shards(root: Path, num_pairs: int, per_shard: int, latent_shape: tuple, text_shape: tuple) -> Path:
    import webdataset as wds

    g = torch.Generator().manual_seed(0)
    (root / "train").mkdir(parents=True)
    shards = []
    for n, first in enumerate(range(0, num_pairs, per_shard)):
        rel = f"train/pairs-{n:06d}.tar"
        count = min(per_shard, num_pairs - first)
        with open(root / rel, "wb") as f:
            writer = wds.TarWriter(f)
            for i in range(first, first + count):
                writer.write(encode_sample(f"p{i:06d}", {
                    "latents_w": torch.randn(latent_shape, generator=g), "latents_l": torch.randn(latent_shape, generator=g),
                    "prompt_embeds": torch.randn(text_shape, generator=g)}, {"clip_id": f"p{i:06d}", "caption": "x"}))
            writer.close()
        shards.append({"path": rel, "num_samples": count})
    (root / "index.json").write_text(json.dumps({"format": "regdpo-pairs/2", "splits": {"train": {
        "num_samples": num_pairs, "shards": shards}}}))
    return root


def loader_rate(source: PairSource, batch: int, steps: int, workers: int) -> dict[str, float]:
    """Pairs/s over `steps` steps, the workers' start-up included (first batch timed apart)."""
    start = time.perf_counter()
    it = iter(make_loader(source, Split(batch), seed=0, segment=0, segment_start=0, start_step=0, end_step=steps,
                          num_workers=workers))
    next(it)
    first = time.perf_counter() - start
    rest = sum(1 for _ in it)
    total = time.perf_counter() - start
    return {"workers": workers, "first_batch_s": first, "pairs_per_s": (rest + 1) * batch / total,
            "steady_pairs_per_s": rest * batch / max(total - first, 1e-9)}


def train_rate(cfg, source: PairSource, steps: int, warmup: int) -> dict[str, float]:
    ctx = D.init("cpu")
    spec = load_model(cfg.model)
    tc = cfg.train
    run = loop._build(cfg, spec, ctx, source, Split(tc.batch_size), Path(tempfile.mkdtemp()),
                      fresh_state("bench", source), "bench", warmup + steps)
    batches = list(make_loader(source, Split(tc.batch_size), seed=0, segment=0, segment_start=0, start_step=0,
                               end_step=warmup + steps))
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loop.train_step(run, [batch])
        run.state.step += 1
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_step_s": median, "pairs_per_s": tc.batch_size / median}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="the model and batch of the step")
    p.add_argument("--shards", help="a shards/ folder (default: synthetic pairs at the config's shapes)")
    p.add_argument("--pairs", type=int, default=256, help="synthetic pairs")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-steps", type=int, default=400)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    cfg = load_config(args.config, {"model.device": "cpu", "train.loader_workers": 0})
    v, tc = cfg.video, cfg.train
    latent_shape = load_model(cfg.model).latent_shape(v.num_frames, v.height, v.width)
    text_shape = (cfg.model.max_sequence_length, 384)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else synthetic_shards(Path(tmp) / "shards", args.pairs,
                                                                       args.per_shard, latent_shape, text_shape)
        source = PairSource.from_index(root)
        loaders = [loader_rate(source, tc.batch_size, args.loader_steps, w) for w in (0, args.workers)]
        training = train_rate(cfg, source, args.train_steps, args.warmup)
    ratio = loaders[-1]["pairs_per_s"] / training["pairs_per_s"]
    print(f"shards: {'synthetic' if not args.shards else args.shards}, {source.num_pairs} pairs in "
          f"{len(source.shards)} shards; latents {tuple(latent_shape)}, text {text_shape}; batch {tc.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in loaders:
        print(f"loader, {r['workers']} workers: {r['pairs_per_s']:.0f} pairs/s ({r['steady_pairs_per_s']:.0f} after the "
              f"first batch, which took {r['first_batch_s']:.2f} s)")
    print(f"training step (tiny Wan, Reg-DPO LoRA, batch {tc.batch_size}): {training['median_step_s']:.4f} s median = "
          f"{training['pairs_per_s']:.1f} pairs/s")
    print(f"loader_over_step = {ratio:.1f}  (goal >= 10)")
    result = {"loader_over_step": ratio, "benchmark": "loader", "loader": loaders, "training": training,
              "num_pairs": source.num_pairs, "batch_size": tc.batch_size, "config": vars(args),
              "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()},
              "wall_s": time.perf_counter() - started}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
