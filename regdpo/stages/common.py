"""Small helpers the stages share: reading upstream tables and building the model once."""

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
