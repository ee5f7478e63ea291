"""Small helpers the stages share: reading upstream tables, choosing devices."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regdpo.config import Config


def load_clips(workdir: Path) -> pd.DataFrame:
    """ingest/clips.parquet, in clip_id order (the order every later stage iterates in)."""
    path = Path(workdir) / "ingest" / "clips.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run ingest first")
    return pd.read_parquet(path).sort_values("clip_id").reset_index(drop=True)


def load_negatives(workdir: Path) -> pd.DataFrame:
    path = Path(workdir) / "negatives" / "negatives.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run generate first")
    return pd.read_parquet(path)


def load_spec(cfg: Config):
    """The model spec for cfg.model (imported lazily: torch/diffusers are heavy)."""
    from regdpo.models import load_model

    return load_model(cfg.model)


def resolve_devices(devices: list[str] | None, model_device: str) -> list[str | None]:
    """Where a stage's device processes run: the configured list, else every visible GPU when
    model.device is auto/cuda and there are several, else one process on model.device (None)."""
    if devices:
        return list(devices)
    if model_device in ("auto", "cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count > 1:
            return [f"cuda:{i}" for i in range(count)]
    return [None]
