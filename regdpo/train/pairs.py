"""A micro-batch of pairs as model inputs: each pair's one (t, ε), applied to winner and loser.

METHOD.md: within a pair, winner and loser share t, ε and the conditioning; across pairs the
draws are independent. Here pair i of step s draws its ε and then its t from its own generator
(rng.pair_generator(train.seed, s, i)), so a pair's draw depends on neither the micro-batch it
travels in nor the process that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from regdpo.config import TrainConfig
from regdpo.data.shards import conditioning
from regdpo.flow_matching import pair_noise
from regdpo.train.rng import pair_generator


@dataclass
class PairInputs:
    step: int
    index: torch.Tensor  # (m,) the pairs' global indices within the step
    keys: list[str]
    t: torch.Tensor
    noisy_w: torch.Tensor
    target_w: torch.Tensor
    noisy_l: torch.Tensor | None  # None when the objective needs no loser (sft)
    target_l: torch.Tensor | None
    cond: dict[str, torch.Tensor]

    @property
    def num_pairs(self) -> int:
        return self.t.shape[0]

    def both(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Winner and loser as one batch of 2m: (noisy, target, t, cond), winners first."""
        if self.noisy_l is None:
            raise ValueError("this batch was built without the loser (objective sft)")
        cond = {k: torch.cat([v, v]) for k, v in self.cond.items()}
        return (torch.cat([self.noisy_w, self.noisy_l]), torch.cat([self.target_w, self.target_l]),
                torch.cat([self.t, self.t]), cond)


def draw(spec, tc: TrainConfig, step: int, index: int, latents_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε of shape (1, C, F, H, W), t of shape (1,)) of global pair `index` at `step`."""
    g = pair_generator(tc.seed, step, index)
    noise = pair_noise(latents_like, g)
    t = spec.sample_timesteps(1, tc.timesteps, g)
    return noise, t


def pair_inputs(spec, batch: dict[str, Any], tc: TrainConfig, *, with_loser: bool = True) -> PairInputs:
    device = spec.device
    latents_w = batch["latents_w"].to(device, torch.float32)
    draws = [draw(spec, tc, int(batch["step"]), int(i), latents_w[:1]) for i in batch["index"]]
    noise = torch.cat([n for n, _ in draws]).to(device)
    t = torch.cat([t for _, t in draws]).to(device)
    noisy_w, target_w = spec.noisy_and_target(latents_w, noise, t)
    noisy_l = target_l = None
    if with_loser:
        latents_l = batch["latents_l"].to(device, torch.float32)
        noisy_l, target_l = spec.noisy_and_target(latents_l, noise, t)
    cond = {k: v.to(device) for k, v in conditioning(batch).items() if k not in ("index",)}
    return PairInputs(int(batch["step"]), batch["index"], list(batch["key"]), t, noisy_w, target_w, noisy_l,
                      target_l, cond)


def nonfinite_pairs(batch: dict[str, Any]) -> list[str]:
    """Keys of pairs whose stored tensors (latents or conditioning) hold NaN or inf."""
    bad = torch.zeros(len(batch["key"]), dtype=torch.bool)
    for name, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
            bad |= ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1).cpu()
    return [k for k, b in zip(batch["key"], bad.tolist()) if b]
