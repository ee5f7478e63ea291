"""Diffusion-training one-liners shared by the model specs, the trainer and evaluation.

Conventions (docs/METHOD.md):
- Rectified flow / flow matching: x_t = (1 - t)·x0 + t·ε with t in (0, 1) (t = 1 is pure
  noise) and training target y = ε - x0 (the velocity the model predicts).
- DDPM-style models: x_t = √ᾱ·x0 + √(1-ᾱ)·ε; target ε ("epsilon") or v = √ᾱ·ε - √(1-ᾱ)·x0.
- Diffusion DPO draws ONE (t, ε) per pair and uses it for both members: see `pair_noise`.

All functions are pure tensor math: no model, no I/O.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("flow", "epsilon", "v")


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast over a (B, ...) tensor."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε, with t of shape (B,)."""
    tb = _per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity target y = ε - x0."""
    return noise - x0


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ·x0 + √(1-ᾱ)·ε, with ᾱ of shape (B,)."""
    a = _per_sample(alphas_cumprod_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddpm_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor | None = None
) -> torch.Tensor:
    """ε for epsilon-prediction; v = √ᾱ·ε - √(1-ᾱ)·x0 for v-prediction."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v":
        if alphas_cumprod_t is None:
            raise ValueError("v-prediction needs alphas_cumprod_t")
        a = _per_sample(alphas_cumprod_t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown DDPM prediction_type {prediction_type!r}; use 'epsilon' or 'v'")


def noisy_and_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for any prediction type.

    For "flow", t is the continuous time in (0, 1). For "epsilon"/"v", t holds integer
    timesteps indexing `alphas_cumprod` (the scheduler's ᾱ table).
    """
    if prediction_type == "flow":
        return flow_noisy(x0, noise, t), flow_target(x0, noise)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if alphas_cumprod is None:
        raise ValueError(f"prediction_type {prediction_type!r} needs the scheduler's alphas_cumprod")
    a_t = alphas_cumprod.to(x0.device)[t.long()]
    return ddpm_noisy(x0, noise, a_t), ddpm_target(prediction_type, x0, noise, a_t)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of SD3/Wan schedulers: t' = s·t / (1 + (s - 1)·t). shift=1 is identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    num: int,
    *,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Draw `num` flow-matching times in (0, 1): uniform or logit-normal, then shifted."""
    if sampling == "uniform":
        u = torch.rand(num, generator=generator, dtype=torch.float64)
    elif sampling == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(num, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}; use 'uniform' or 'logit_normal'")
    t = shift_timesteps(u, shift).clamp(eps, 1 - eps)
    return t.to(device=device, dtype=torch.float32)


def pair_noise(
    latents_w: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One ε per PAIR, shaped like the winner latents (B, C, F, H, W).

    The caller applies the same ε (and the same t) to the winner and the loser of pair i;
    different pairs get independent draws. Drawn on CPU in float32 so a seed gives the same
    noise on every device.
    """
    noise = torch.randn(latents_w.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=latents_w.device)
