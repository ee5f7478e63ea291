"""METHOD.md's checks for the Reg-DPO math, against hand-written float64 references."""

import math

import pytest
import torch

from regdpo.losses import dgr, dpo_loss, per_sample_error, preference_loss, sft_coefficient

BETA = 1000.0


@pytest.mark.parametrize(
    "s, expected",
    [(0.0, 500.0), (-0.001, 268.9), (-0.005, 6.69), (-0.01, 0.0454), (-0.02, 2.06e-6)],
)
def test_dgr_table(s, expected):
    # METHOD.md's table, to 3 significant figures.
    got = float(dgr(torch.tensor(s, dtype=torch.float64), BETA))
    assert float(f"{got:.3g}") == pytest.approx(float(f"{expected:.3g}"), rel=1e-9)


def test_dgr_matches_closed_form_float64():
    s = torch.linspace(-0.03, 0.03, 61, dtype=torch.float64)
    ref = torch.tensor([BETA / (1 + math.exp(-BETA * v)) for v in s.tolist()], dtype=torch.float64)
    torch.testing.assert_close(dgr(s, BETA), ref, rtol=1e-12, atol=0)


def test_dpo_loss_float64_reference():
    s = torch.tensor([-0.02, -0.001, 0.0, 0.003], dtype=torch.float64)
    ref = torch.tensor([-math.log(1 / (1 + math.exp(BETA * v))) for v in s.tolist()], dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(s, BETA), ref, rtol=1e-12, atol=1e-15)


def test_per_sample_error_is_float32_mean_over_non_batch_dims():
    pred = torch.randn(3, 4, 2, 5, 6, dtype=torch.bfloat16)
    target = torch.randn(3, 4, 2, 5, 6, dtype=torch.bfloat16)
    err = per_sample_error(pred, target)
    assert err.dtype == torch.float32 and err.shape == (3,)
    ref = [((pred[i].double() - target[i].double()) ** 2).sum().item() / (4 * 2 * 5 * 6) for i in range(3)]
    torch.testing.assert_close(err.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)


def test_reg_dpo_loss_float64_reference():
    err_w = torch.tensor([0.51, 0.30], dtype=torch.float64)
    err_l = torch.tensor([0.52, 0.28], dtype=torch.float64)
    ref_w = torch.tensor([0.50, 0.30], dtype=torch.float64)
    ref_l = torch.tensor([0.50, 0.29], dtype=torch.float64)
    out = preference_loss(err_w, err_l, ref_w, ref_l, beta=BETA)
    expected = 0.0
    for a, b, ra, rb in zip(err_w.tolist(), err_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        s = (a - b) - (ra - rb)
        d = BETA / (1 + math.exp(-BETA * s))
        expected += math.log(1 + math.exp(BETA * s)) + d * a
    expected /= 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["win_gap"] == pytest.approx(((0.51 - 0.50) + 0.0) / 2)
    assert out.metrics["lose_gap"] == pytest.approx(((0.52 - 0.50) + (0.28 - 0.29)) / 2)
    # pair 0: s = 0.01 - 0.02 = -0.01 < 0; pair 1: s = 0.0 - (-0.01) = 0.01 > 0
    assert out.metrics["implicit_acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("s0", [0.0, -0.001, -0.004, 0.002])
@pytest.mark.parametrize("r_mode,r_scale,r_constant", [("dgr", 1.0, 0.0), ("dgr", 0.5, 0.0), ("constant", 1.0, 125.0)])
def test_gradient_matches_analytic(s0, r_mode, r_scale, r_constant):
    # d L_RegDPO / d err_w = DGR + r ; d L_RegDPO / d err_l = -DGR
    ref_w = torch.tensor([0.4], dtype=torch.float64)
    ref_l = torch.tensor([0.4], dtype=torch.float64)
    err_w = torch.tensor([0.4 + s0], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    out = preference_loss(err_w, err_l, ref_w, ref_l, beta=BETA, r_mode=r_mode, r_scale=r_scale, r_constant=r_constant)
    out.loss.backward()
    d = BETA / (1 + math.exp(-BETA * s0))
    r = r_scale * d if r_mode == "dgr" else r_constant
    assert err_w.grad.item() == pytest.approx(d + r, rel=1e-9)
    assert err_l.grad.item() == pytest.approx(-d, rel=1e-9)


def test_plain_dpo_gradient_has_no_sft_term():
    err_w = torch.tensor([0.41], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.40], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.40], dtype=torch.float64)
    preference_loss(err_w, err_l, ref, ref, beta=BETA, objective="dpo").loss.backward()
    d = BETA / (1 + math.exp(-BETA * 0.01))
    assert err_w.grad.item() == pytest.approx(d, rel=1e-9)
    assert err_l.grad.item() == pytest.approx(-d, rel=1e-9)


def test_sft_objective_is_winner_error():
    err_w = torch.tensor([0.3, 0.5], requires_grad=True)
    err_l = torch.tensor([0.1, 0.1])
    out = preference_loss(err_w, err_l, err_w.detach(), err_l, objective="sft")
    assert out.loss.item() == pytest.approx(0.4)
    out.loss.backward()
    torch.testing.assert_close(err_w.grad, torch.tensor([0.5, 0.5]))


def test_policy_equals_reference_gives_log2():
    err_w, err_l = torch.rand(8), torch.rand(8)
    out = preference_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=BETA)
    assert out.metrics["s"] == 0.0
    assert out.metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["dgr"] == pytest.approx(BETA / 2)
    assert out.metrics["r"] == pytest.approx(BETA / 2)


def test_r_is_detached():
    s = torch.tensor([-0.001], requires_grad=True)
    r = sft_coefficient(s, BETA)
    assert not r.requires_grad


def test_bad_objective_and_r_mode_are_errors():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="objective"):
        preference_loss(x, x, x, x, objective="ppo")
    with pytest.raises(ValueError, match="r_mode"):
        sft_coefficient(x, BETA, r_mode="linear")
