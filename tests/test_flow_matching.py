"""Flow-matching and DDPM targets against float64 hand-written references; pair noise sharing."""

import pytest
import torch

from regdpo import flow_matching as fm
from regdpo.losses import per_sample_error


def test_flow_noisy_and_target_float64():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64)
    eps = torch.tensor([[0.1, 0.2], [-1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([0.25, 0.9], dtype=torch.float64)
    xt = fm.flow_noisy(x0, eps, t)
    ref = torch.tensor([[0.75 * 1.0 + 0.25 * 0.1, 0.75 * -2.0 + 0.25 * 0.2],
                        [0.1 * 0.5 + 0.9 * -1.0, 0.1 * 0.25 + 0.9 * 3.0]], dtype=torch.float64)
    torch.testing.assert_close(xt, ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(fm.flow_target(x0, eps), torch.tensor([[-0.9, 2.2], [-1.5, 2.75]], dtype=torch.float64))
    # the velocity carries x_t to x0 and ε: x_t - t·y = x0, x_t + (1-t)·y = ε
    y = fm.flow_target(x0, eps)
    torch.testing.assert_close(xt - t[:, None] * y, x0)
    torch.testing.assert_close(xt + (1 - t[:, None]) * y, eps)


def test_ddpm_targets_float64():
    x0 = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.5, 0.3]], dtype=torch.float64)
    a = torch.tensor([0.64], dtype=torch.float64)  # √ᾱ = 0.8, √(1-ᾱ) = 0.6
    torch.testing.assert_close(fm.ddpm_noisy(x0, eps, a), torch.tensor([[0.8 * 2 + 0.6 * 0.5, 0.8 * -1 + 0.6 * 0.3]], dtype=torch.float64))
    torch.testing.assert_close(fm.ddpm_target("epsilon", x0, eps, a), eps)
    torch.testing.assert_close(fm.ddpm_target("v", x0, eps, a), torch.tensor([[0.8 * 0.5 - 0.6 * 2, 0.8 * 0.3 - 0.6 * -1]], dtype=torch.float64))


def test_noisy_and_target_dispatch():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    xt, y = fm.noisy_and_target("v", x0.double(), eps.double(), torch.tensor([10, 500]), alphas)
    a = alphas[[10, 500]]
    torch.testing.assert_close(y, a.sqrt()[:, None] * eps.double() - (1 - a).sqrt()[:, None] * x0.double())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fm.noisy_and_target("epsilon", x0, eps, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prediction_type"):
        fm.noisy_and_target("x0", x0, eps, torch.tensor([0.1, 0.2]))


def test_shift_and_sampling():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(fm.shift_timesteps(t, 3.0), torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    u = fm.sample_timesteps(20000, sampling="uniform", generator=g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = fm.sample_timesteps(20000, sampling="logit_normal", generator=g)
    logit = torch.log(ln) - torch.log1p(-ln)
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    shifted = fm.sample_timesteps(20000, sampling="logit_normal", shift=3.0, generator=g)
    assert shifted.mean() > ln.mean() + 0.1  # shift moves mass towards noise
    with pytest.raises(ValueError, match="sampling"):
        fm.sample_timesteps(4, sampling="beta")


def test_pair_shares_t_and_noise_within_pair_not_across():
    # The trainer's recipe: one (t, ε) per pair, applied to winner and loser alike.
    g = torch.Generator().manual_seed(0)
    latents_w, latents_l = torch.randn(4, 2, 3, 4, 4), torch.randn(4, 2, 3, 4, 4)
    noise = fm.pair_noise(latents_w, g)
    t = fm.sample_timesteps(4, generator=g)
    xt_w, y_w = fm.noisy_and_target("flow", latents_w, noise, t)
    xt_l, y_l = fm.noisy_and_target("flow", latents_l, noise, t)
    # same ε within a pair: the noise recovered from each member is identical
    torch.testing.assert_close(xt_w + (1 - t[:, None, None, None, None]) * y_w, noise)
    torch.testing.assert_close(xt_l + (1 - t[:, None, None, None, None]) * y_l, noise)
    # different across pairs
    assert len(set(t.tolist())) == 4
    assert not torch.allclose(noise[0], noise[1])
    # reproducible from the seed
    g2 = torch.Generator().manual_seed(0)
    torch.testing.assert_close(fm.pair_noise(latents_w, g2), noise)


def test_error_of_a_prediction_against_the_target():
    # A model that knows x0 predicts the velocity from what it is given (x_t, t): its error is 0;
    # a prediction off by δ everywhere costs δ² per sample (mean over C, F, H, W), whatever t.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([0.3, 0.8])
    xt, target = fm.noisy_and_target("flow", x0, eps, t)
    perfect = (xt - x0) / t[:, None, None, None, None]
    torch.testing.assert_close(per_sample_error(perfect, target), torch.zeros(2), atol=1e-10, rtol=0)
    torch.testing.assert_close(per_sample_error(perfect + torch.tensor([0.5, -2.0])[:, None, None, None, None], target),
                               torch.tensor([0.25, 4.0]))
