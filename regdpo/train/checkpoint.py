"""Resumable training state: step, trainable weights, optimizer, scheduler, RNG. No pickle.

    checkpoints/step-NNNNNN/
        trainable.safetensors   trainable parameters by name (LoRA weights, or all for full FT)
        optimizer.pt            optimizer + scheduler state (plain tensors/numbers; loaded
                                with torch.load(weights_only=True))
        rng.safetensors         the trainer's torch.Generator state
        state.json              step (the data position is the step: see train/data.py)

A checkpoint is written under a temporary name and renamed when complete, so a directory
named step-NNNNNN is always whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class TrainState:
    step: int = 0


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: Path, state: TrainState, named_params: dict[str, torch.Tensor], optimizer, scheduler,
                    generator: torch.Generator, keep: int) -> Path:
    final = checkpoint_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in named_params.items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    save_file({"torch_generator": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": state.step}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    generator: torch.Generator) -> TrainState:
    weights = load_file(path / "trainable.safetensors")
    missing = set(named_params) - set(weights)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                         "it was written for a different model or LoRA setting: delete it or use --force")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    generator.set_state(load_file(path / "rng.safetensors")["torch_generator"])
    return TrainState(**json.loads((path / "state.json").read_text()))
