"""AdamW over the trained (float32 master) weights, the learning-rate schedule, and an EMA.

The schedule is a pure function of the step within the current segment (the steps on the
current shard set), so it needs no state of its own: a resumed run sets the same rates.
Linear warmup over `warmup_steps`, then constant, or cosine down to min_lr_ratio x lr at
`max_steps`. A run continued over an enlarged shard set starts a new segment: warmup and the
cosine start again there.
"""

from __future__ import annotations

import math

import torch

from regdpo.config import TrainConfig


def lr_at(step_in_segment: int, tc: TrainConfig) -> float:
    if step_in_segment < tc.warmup_steps:
        return tc.learning_rate * (step_in_segment + 1) / (tc.warmup_steps + 1)
    if tc.lr_schedule == "constant":
        return tc.learning_rate
    span = max(tc.max_steps - tc.warmup_steps, 1)
    progress = min((step_in_segment - tc.warmup_steps) / span, 1.0)
    floor = tc.min_lr_ratio * tc.learning_rate
    return floor + (tc.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: dict[str, torch.nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    bad = [n for n, p in params.items() if p.dtype != torch.float32]
    if bad:  # bf16 weights under AdamW lose most updates (an lr 1e-5 step rounds away)
        raise AssertionError(f"trained weights must be float32 masters; {bad[0]} is {params[bad[0]].dtype}")
    return torch.optim.AdamW(list(params.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of the trained weights, float32, same layout (sharded under FSDP)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {n: p.detach().clone().float() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
