"""Diffusion-DPO and Reg-DPO losses as pure functions of per-sample errors.

Public API (see docs/METHOD.md for the derivation):

    err    = per_sample_error(pred, target)            # mean over (C,F,H,W), float32
    s      = preference_margin(err_w, err_l, ref_err_w, ref_err_l)
    dgr(s, beta)                                       # DPO gradient ratio β·σ(β·s)
    out    = preference_loss(err_w, err_l, ref_err_w, ref_err_l, beta=1000.0)
    out.loss.backward(); out.metrics                   # floats: s, dgr, r, win_gap, ...

Reduction: the error is a MEAN over all non-batch elements (not a sum). β's scale depends on
that choice; β = 1000 is the default for the mean reduction used here.

    L_DPO    = -log σ(-β·s)  = softplus(β·s)
    L_RegDPO = -log σ(-β·s) + r·err_θ(w),     r detached (never differentiated)

so that dL/d err_θ(w) = DGR + r and dL/d err_θ(l) = -DGR. r = k·DGR (k = 1 by default) or a
constant. The batch loss is the mean over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OBJECTIVES = ("reg-dpo", "dpo", "sft")
R_MODES = ("dgr", "constant")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dim, computed in float32: shape (B,)."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def preference_margin(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor
) -> torch.Tensor:
    """s = [err_θ(w) - err_θ(l)] - [err_ref(w) - err_ref(l)]. Training succeeds when s < 0."""
    return (err_w - err_l) - (ref_err_w - ref_err_l)


def dgr(s: torch.Tensor | float, beta: float) -> torch.Tensor:
    """DPO gradient ratio: β·(1 - σ(-β·s)) = β·σ(β·s). β/2 at s = 0; collapses as s goes negative."""
    s = torch.as_tensor(s, dtype=torch.float64 if not torch.is_tensor(s) else None)
    return beta * torch.sigmoid(beta * s)


def dpo_loss(s: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair -log σ(-β·s), written as softplus(β·s) for numerical stability."""
    return F.softplus(beta * s)


def sft_coefficient(
    s: torch.Tensor, beta: float, *, r_mode: str = "dgr", r_scale: float = 1.0, r_constant: float = 0.0
) -> torch.Tensor:
    """r per pair, detached: k·DGR(s) ("dgr") or a constant ("constant")."""
    if r_mode == "dgr":
        return (r_scale * dgr(s.detach(), beta)).detach()
    if r_mode == "constant":
        return torch.full_like(s, float(r_constant)).detach()
    raise ValueError(f"unknown r_mode {r_mode!r}; choose one of {R_MODES}")


@dataclass
class PreferenceLossOutput:
    loss: torch.Tensor  # scalar, differentiable: the mean of pair_loss
    metrics: dict[str, float] = field(default_factory=dict)  # batch means, plain floats
    # (B,) per pair: the differentiable loss, and every metric detached. A trainer that splits
    # a global batch over processes and micro-batches sums these and divides by the global
    # batch size, so its numbers do not depend on the split.
    pair_loss: torch.Tensor | None = None
    per_pair: dict[str, torch.Tensor] = field(default_factory=dict)


def _output(pair_loss: torch.Tensor, per_pair: dict[str, torch.Tensor]) -> PreferenceLossOutput:
    per_pair = {"loss": pair_loss.detach(), **{k: v.detach().float() for k, v in per_pair.items()}}
    return PreferenceLossOutput(loss=pair_loss.mean(), metrics={k: v.mean().item() for k, v in per_pair.items()},
                                pair_loss=pair_loss, per_pair=per_pair)


def winner_loss(err_w: torch.Tensor) -> PreferenceLossOutput:
    """Objective "sft" alone: the winner's error, mean over pairs. Needs neither the loser nor
    the reference, so a trainer runs neither."""
    return _output(err_w, {"sft_loss": err_w, "err_w": err_w})


def preference_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float = 1000.0,
    objective: str = "reg-dpo",
    r_mode: str = "dgr",
    r_scale: float = 1.0,
    r_constant: float = 0.0,
) -> PreferenceLossOutput:
    """The training loss for a batch of pairs, from per-sample errors of shape (B,).

    objective: "reg-dpo" (DPO + r·err_θ(w)), "dpo" (r = 0) or "sft" (err_θ(w) alone, see
    `winner_loss`; err_l and the reference errors are then ignored). The reference errors must
    not require grad. Metrics are batch means (implicit_acc is the fraction of pairs with
    s < 0), all plain floats for logging; `per_pair` holds the same per pair.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if objective == "sft":
        return winner_loss(err_w)
    ref_err_w, ref_err_l = ref_err_w.detach(), ref_err_l.detach()
    s = preference_margin(err_w, err_l, ref_err_w, ref_err_l)
    l_dpo = dpo_loss(s, beta)
    ratio = dgr(s.detach(), beta)
    if objective == "reg-dpo":
        r = sft_coefficient(s, beta, r_mode=r_mode, r_scale=r_scale, r_constant=r_constant)
    else:
        r = torch.zeros_like(s)
    return _output(l_dpo + r * err_w, {
        "dpo_loss": l_dpo,
        "sft_loss": err_w,
        "s": s,
        "dgr": ratio,
        "r": r,
        "win_gap": err_w - ref_err_w,
        "lose_gap": err_l - ref_err_l,
        "implicit_acc": (s < 0).float(),
        "err_w": err_w,
        "err_l": err_l,
        "ref_err_w": ref_err_w,
        "ref_err_l": ref_err_l,
    })
