"""When training stops instead of publishing garbage, and what its message blames.

- Non-finite steps are skipped (loop.train_step); `train.max_nonfinite_steps` of them in a row
  stop the run: NaN/inf in named pairs' stored tensors is blamed on the data, otherwise on the
  learning rate.
- A step's loss above `train.divergence.max_loss` (every step: the loss is already reduced over
  processes) stops the run. When the base model itself would have had such a loss on those
  pairs (from their reference errors), the pairs are to blame; otherwise the learning rate.
- A trained weight beyond `train.divergence.max_weight_abs` (every `train.log_every` steps and
  before every checkpoint, hence before the final export) stops the run: the learning rate.
  An optimizer step with a too-large rate can still have a finite loss and a zero gradient norm
  (seen: lr 1e3 gave a LoRA with |w| = 1.5e4), so the weights themselves are checked.

Every check is decided identically on every process (reduced values), so all raise together.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from regdpo.train import distributed as D


class TrainingDiverged(FloatingPointError, ValueError):
    """Training stopped: the run diverged or met non-finite data. A ValueError too: retrying the
    same settings cannot help (orchestrators do not retry it)."""


def _pairs(keys: list[str]) -> str:
    keys = sorted(set(keys))
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def nonfinite_message(state, row: dict[str, Any], bad_keys: list[str], tc) -> str:
    n = state.nonfinite_run
    where = f"steps {state.step - n}-{state.step - 1}" if n > 1 else f"step {state.step - 1}"
    if bad_keys:
        cause = (f"pair(s) {_pairs(bad_keys)} hold non-finite latents or conditioning in the shards: rerun encode for "
                 "them (regdpo run CONFIG --stage encode --force)")
    else:
        cause = (f"the loss or the gradients overflowed: lower train.learning_rate (now {tc.learning_rate}) or "
                 "train.grad_clip, or use model.dtype float32")
    return (f"training stopped: {n} steps in a row ({where}) had a non-finite loss or gradient norm "
            f"(last: loss {row.get('loss')}, grad_norm {row.get('grad_norm')}) and were skipped; likely cause: "
            f"{cause}. train.max_nonfinite_steps ({tc.max_nonfinite_steps}) sets how many are tolerated.")


def base_loss(row: dict[str, Any], tc) -> float | None:
    """The step's loss had the policy been the base model (s = 0, DGR = β/2), from the base
    model's own errors on the step's pairs; None where the objective runs no reference (sft)."""
    ref_w = row.get("ref_err_w")
    if not isinstance(ref_w, float) or tc.objective == "sft":
        return None
    r0 = 0.0 if tc.objective == "dpo" else (tc.r_scale * tc.beta / 2 if tc.r_mode == "dgr" else tc.r_constant)
    return math.log(2.0) + r0 * ref_w


def check_loss(row: dict[str, Any], keys: list[str], tc) -> None:
    """Stop when step `row["step"]`'s (finite) loss is beyond train.divergence.max_loss.

    The cause: the data (or a bound below this objective's normal loss) when the base model
    itself would have had a loss that large on these pairs; otherwise the learning rate.
    `keys`: every pair of the step (all processes). No collective: the row is reduced already."""
    loss, bound = row.get("loss"), tc.divergence.max_loss
    if loss is None or not math.isfinite(loss) or loss <= bound:
        return
    base = base_loss(row, tc)
    if base is not None and base > bound:
        cause = (f"the data: the base model itself has a loss of {base:.4g} on pair(s) {_pairs(keys)} (err_ref(w) "
                 f"{row['ref_err_w']:.4g}): check their latents and rerun encode for them (regdpo run CONFIG --stage "
                 "encode --force), or raise train.divergence.max_loss if such a loss is normal for this train.beta")
    elif base is not None:
        cause = (f"the policy diverged (the base model's loss on these pairs is {base:.4g}): lower "
                 f"train.learning_rate (now {tc.learning_rate})")
    else:
        cause = (f"the learning rate if the loss grew during training: lower train.learning_rate (now "
                 f"{tc.learning_rate}); else the data of pair(s) {_pairs(keys)}")
    raise TrainingDiverged(f"training stopped at step {row['step']}: loss {loss:.4g} exceeds "
                           f"train.divergence.max_loss ({bound:g}); likely cause: {cause}. Nothing diverged was "
                           "checkpointed or published.")


@torch.no_grad()
def max_weight_abs(params: dict[str, torch.Tensor]) -> float:
    """max |w| over the trained weights, over every process (NaN if any is NaN)."""
    # one value per tensor on its device, one transfer in all (amax propagates NaN)
    per_tensor = [v.abs().amax().float() for v in (D.local_values(p.detach()) for p in params.values()) if v.numel()]
    local = torch.stack(per_tensor).max().item() if per_tensor else 0.0
    maxima = [float(v) for v in D.gather_json(local)]
    return math.nan if any(math.isnan(v) for v in maxima) else max(maxima)


def check_weights(params: dict[str, torch.Tensor], step: int, tc, *, starting: bool = False) -> None:
    """Stop when a trained weight is non-finite or beyond train.divergence.max_weight_abs.

    `step`: the last step taken (as metrics.jsonl numbers it), or with `starting` the step the run
    starts at: the weights it starts from (the base model or a checkpoint) breaking the bound is
    a setting to raise, not a divergence."""
    value, bound = max_weight_abs(params), tc.divergence.max_weight_abs
    if math.isfinite(value) and value <= bound:
        return
    if starting:
        raise ValueError(f"the weights training starts from (the base model, or a checkpoint at step {step}) "
                         f"already reach |w| = {value:.4g}, beyond train.divergence.max_weight_abs ({bound:g}): "
                         f"raise it above {value:.4g}")
    raise TrainingDiverged(f"training stopped after step {step}: the trained weights reached |w| = {value:.4g}, beyond "
                           f"train.divergence.max_weight_abs ({bound:g}); likely cause: the learning rate is too "
                           f"high: lower train.learning_rate (now {tc.learning_rate}). Nothing diverged was "
                           "checkpointed or published.")
