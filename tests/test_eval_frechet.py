"""Fréchet distance (regdpo/eval/frechet.py) against a float64 numpy/scipy reference."""

import numpy as np
import pytest
import scipy.linalg

from regdpo.eval.frechet import feature_stats, frechet_distance, frechet_distance_between


def _reference(x, y):
    """The pytorch-fid formula in float64: sqrtm of the product, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dims,seed", [(4, 0), (16, 1), (32, 2)])
def test_matches_scipy_reference_on_random_gaussians(dims, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dims, dims))
    x = rng.normal(size=(600, dims)) @ a
    y = rng.normal(0.3, 1.2, size=(500, dims)) @ rng.normal(size=(dims, dims))
    assert frechet_distance_between(x, y) == pytest.approx(_reference(x, y), rel=1e-7)


def test_identical_sets_are_at_distance_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 8)), rng.normal(1.0, 2.0, size=(40, 8))
    assert frechet_distance_between(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_between(x, y) == pytest.approx(frechet_distance_between(y, x), rel=1e-9)


def test_rank_deficient_covariances_match_the_closed_form():
    """Covariances diagonal in a common rotated basis, with zero variances: FD = |Δμ|² + Σ (√a - √b)².
    This is the case of a few clips in many feature dimensions."""
    rng = np.random.default_rng(4)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = np.r_[rng.uniform(0.5, 2.0, 5), np.zeros(d - 5)]
    b = np.r_[rng.uniform(0.5, 2.0, 3), np.zeros(d - 3)]
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_few_samples_in_many_dimensions_stay_finite():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, 54)), rng.normal(size=(3, 54))
    fd = frechet_distance_between(x, y)
    assert np.isfinite(fd) and fd > 0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("n1,n2,dims", [(5, 7, 40), (12, 3, 64), (30, 30, 30)])
def test_the_sample_form_for_few_vectors_matches_the_covariance_form(n1, n2, dims):
    rng = np.random.default_rng(n1 * dims)
    x, y = rng.normal(size=(n1, dims)), rng.normal(0.5, 2.0, size=(n2, dims))
    by_cov = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert frechet_distance_between(x, y) == pytest.approx(by_cov, rel=1e-9)
    assert frechet_distance_between(x, y) == pytest.approx(_reference(x, y), rel=1e-6)
