"""Helpers for tests that run real stages on a couple of short sample clips."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
TWO_CLIPS = [
    ("cartoon_hills_pan.mp4", "A cartoon landscape with pink clouds, rolling green hills and a tall fir tree."),
    ("snowy_traveler.mp4", "An animated hooded traveler walks toward the camera through a snowy blizzard."),
]


def small_config(root: Path, **sections) -> Path:
    """A tiny-model config over two short real clips copied into `root`; returns the YAML path."""
    data = root / "videos"
    data.mkdir(parents=True, exist_ok=True)
    lines = ["path,caption"]
    for name, caption in TWO_CLIPS:
        shutil.copy(SAMPLES / name, data / name)
        lines.append(f'{name},"{caption}"')
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    cfg = {
        "workdir": "run",
        "model": {"preset": "tiny", "device": "cpu", "max_sequence_length": 16},
        "video": {"fps": 8, "num_frames": 9, "height": 32, "width": 32},
        "ingest": {"manifest": "videos/manifest.csv", "min_side": 32, "heldout_fraction": 0.5, "min_heldout": 1},
        "generate": {"num_inference_steps": 2, "guidance_scale": 1.0},
        "encode": {"samples_per_shard": 2},
        "train": {"max_steps": 3, "batch_size": 1, "checkpoint_every": 2, "learning_rate": 1e-3,
                  "lora": {"rank": 4, "alpha": 4}},
        "evaluate": {"timesteps": [0.3, 0.7]},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
