"""Every random draw of training comes from a seed derived from (train.seed, what, step, index).

So the randomness of a step is a function of the step, not of how many processes, micro-batches
or loader workers share the work, nor of what ran before: a resumed run draws exactly what the
uninterrupted one drew without any RNG state being saved, and the checkpointed step is the
whole RNG state. Used for: each pair's (t, noise) (`pair_generator`), the data order of each
epoch (loader.py), and the dropout masks of each micro-batch (`seed_dropout`).
"""

from __future__ import annotations

import torch

from regdpo.hashing import derive_seed


def pair_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of global pair `index` (0..batch_size-1) of optimizer step `step`: its
    noise and timestep are drawn from it, whichever process and micro-batch carries the pair."""
    return torch.Generator().manual_seed(derive_seed(seed, "pair", step, index))


def seed_dropout(seed: int, step: int, first_index: int) -> None:
    """Seed torch's global RNGs (CPU and CUDA, which dropout uses) for the micro-batch whose
    first global pair index is `first_index`. Dropout masks then depend on the step and the
    micro-batch only, so resuming reproduces them."""
    torch.manual_seed(derive_seed(seed, "dropout", step, first_index))
