"""World clips on disk: mp4 files and a manifest the ingest stage reads like any other.

    from regdpo.world import WorldSpec, write_world
    manifest = write_world("data/world/tune", num_clips=256, seed=1, spec=WorldSpec(size=32))

Clip i of a world is drawn from its own seed, derive_seed("world", seed, i), so it is the same
clip whatever the number of clips asked for, and two worlds with different seeds share no clip.
The folder holds `<name>.mp4` per clip, `manifest.csv` (path, caption) and `world.json` (the
spec, seed and count); the manifest is written last, atomically, so a folder with a manifest is
whole. Asking again for the same world reuses the folder.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from regdpo.data.video import write_mp4
from regdpo.durable import atomic_write_text
from regdpo.hashing import derive_seed
from regdpo.world.rules import Scene, WorldSpec, sample_scene


def scene(spec: WorldSpec, seed: int, index: int) -> Scene:
    """Clip `index` of the world with this spec and seed."""
    return sample_scene(np.random.default_rng(derive_seed("world", seed, index)), spec)


def scenes(spec: WorldSpec, seed: int, num_clips: int, first: int = 0) -> Iterator[Scene]:
    for i in range(first, first + num_clips):
        yield scene(spec, seed, i)


def clip_name(seed: int, index: int) -> str:
    return f"world-s{seed}-{index:06d}"


def write_world(out: str | Path, num_clips: int, *, seed: int, spec: WorldSpec = WorldSpec()) -> Path:
    """Write `num_clips` clips and their manifest into `out`; returns the manifest's path.

    A folder already holding this exact world (same spec, seed and count) is reused as is; one
    holding another world is refused rather than mixed."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1; got {num_clips}")
    out = Path(out)
    manifest, meta_path = out / "manifest.csv", out / "world.json"
    meta = {"spec": asdict(spec), "seed": seed, "num_clips": num_clips}
    if manifest.is_file() and meta_path.is_file():
        if json.loads(meta_path.read_text()) == meta:
            return manifest
        raise ValueError(f"{out} already holds another world ({meta_path.read_text().strip()}); choose another "
                         "folder or delete it")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a world folder; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "caption"])
    for i, sc in enumerate(scenes(spec, seed, num_clips)):
        name = f"{clip_name(seed, i)}.mp4"
        write_mp4(out / name, sc.render(), spec.fps)
        writer.writerow([name, sc.caption()])
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    atomic_write_text(manifest, rows.getvalue())
    return manifest


def remove_world(out: str | Path) -> None:
    """Delete a world folder (only one `write_world` made: it must hold world.json)."""
    out = Path(out)
    if not (out / "world.json").is_file():
        raise ValueError(f"{out} is not a world folder (no world.json); not deleting it")
    shutil.rmtree(out)
