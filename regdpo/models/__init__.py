"""Model specs: `load_model(cfg.model)` is the only way stages obtain a model.

Each family lives in its own module behind `VideoModelSpec` (base.py); nothing outside this
package imports family code. `load_model` loads no weights: the spec loads each role (condition
models, latent model, denoiser) when a stage first uses it.
"""

from __future__ import annotations

import torch

from regdpo.config import ModelConfig
from regdpo.models.base import VideoModelSpec

__all__ = ["VideoModelSpec", "load_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(model_cfg: ModelConfig) -> VideoModelSpec:
    """The spec for `model_cfg.family` (its tiny preset or a local model directory); nothing loaded yet."""
    from regdpo.models.wan import WanT2VSpec  # lazy: diffusers is slow to import
    from regdpo.models.wan_i2v import WanI2VSpec

    families = {"wan-t2v": WanT2VSpec, "wan-i2v": WanI2VSpec}
    if model_cfg.family not in families:
        raise ValueError(f"model.family {model_cfg.family!r} is not supported; choose one of {sorted(families)}")
    return families[model_cfg.family].from_config(model_cfg, resolve_device(model_cfg.device))
