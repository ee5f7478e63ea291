"""The frozen reference model of DPO, without a second copy where possible.

LoRA: the reference is the same transformer with its adapters disabled (no extra memory).
Full fine-tuning: a frozen deep copy of the initial denoiser, passed to predict instead of
the policy.
"""

from __future__ import annotations

import copy

import torch


class AdapterReference:
    """Reference = policy weights with LoRA adapters switched off."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    def predict(self, spec, noisy, t, cond) -> torch.Tensor:
        spec.set_adapters_enabled(self.policy, False)
        try:
            with torch.no_grad():
                return spec.predict(self.policy, noisy, t, cond)
        finally:
            spec.set_adapters_enabled(self.policy, True)


class FrozenCopyReference:
    """Reference = a frozen copy of the transformer as it was before training."""

    def __init__(self, policy: torch.nn.Module):
        self.transformer = copy.deepcopy(policy).requires_grad_(False).eval()

    def predict(self, spec, noisy, t, cond) -> torch.Tensor:
        with torch.no_grad():
            return spec.predict(self.transformer, noisy, t, cond)


def make_reference(policy: torch.nn.Module, finetune: str):
    return AdapterReference(policy) if finetune == "lora" else FrozenCopyReference(policy)
