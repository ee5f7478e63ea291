"""The frozen reference model of DPO, without a second copy where possible.

LoRA: the reference is the same transformer with its adapters disabled (no extra memory).
Full fine-tuning: a frozen deep copy of the initial transformer, swapped in for the
reference forward pass.
"""

from __future__ import annotations

import copy

import torch


class AdapterReference:
    """Reference = policy weights with LoRA adapters switched off."""

    def predict(self, spec, noisy, t, cond) -> torch.Tensor:
        spec.set_adapters_enabled(False)
        try:
            with torch.no_grad():
                return spec.predict(noisy, t, cond)
        finally:
            spec.set_adapters_enabled(True)


class FrozenCopyReference:
    """Reference = a frozen copy of the transformer as it was before training."""

    def __init__(self, spec):
        self.transformer = copy.deepcopy(spec.transformer).requires_grad_(False).eval()

    def predict(self, spec, noisy, t, cond) -> torch.Tensor:
        policy = spec.transformer
        spec.transformer = self.transformer
        try:
            with torch.no_grad():
                return spec.predict(noisy, t, cond)
        finally:
            spec.transformer = policy


def make_reference(spec, finetune: str):
    return AdapterReference() if finetune == "lora" else FrozenCopyReference(spec)
