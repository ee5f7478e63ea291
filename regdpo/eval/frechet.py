"""Fréchet distance between two feature sets, each summarised by its mean and covariance.

    FD = |μ1 - μ2|² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^½

FID and FVD are this distance on features of a specific network; with another extractor it is
only "a Fréchet distance", and eval reports say which features were used (features.py).

Numerics: tr (Σ1 Σ2)^½ equals tr (A Σ2 A)^½ with A = Σ1^½, and A Σ2 A is symmetric positive
semi-definite, so its square root's trace is the sum of square roots of its eigenvalues (eigh,
float64, round-off around 0 set to 0). That form has no complex parts and needs no
invertible covariance: a set of n feature vectors in d > n dimensions has a covariance of rank
n - 1, the usual case for a handful of held-out clips.
"""

from __future__ import annotations

import numpy as np


def feature_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) in float64; one row per feature vector."""
    x = np.asarray(features_ND, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_stats needs at least 2 feature vectors shaped (N, D); got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("feature_stats: features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_eigvals(vals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: values within d·eps of the largest are
    zero (the square root would turn a 1e-16 residue into a 1e-8 error)."""
    tol = max(float(np.abs(vals).max(initial=0.0)), 0.0) * len(vals) * np.finfo(np.float64).eps
    return np.where(vals > tol, vals, 0.0)


def _sqrt_psd(sym: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((sym + sym.T) / 2)
    return (vecs * np.sqrt(_psd_eigvals(vals))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2); Σ may be singular."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: μ {mu1.shape} {mu2.shape}, Σ {s1.shape} {s2.shape}")
    a = _sqrt_psd(s1)
    inner = a @ s2 @ a
    tr_covmean = float(np.sqrt(_psd_eigvals(np.linalg.eigvalsh((inner + inner.T) / 2))).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Equal distributions give 0 up to round-off, which may land a hair below it.
    return max(fd, 0.0)


def frechet_distance_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (rows are vectors).

    With fewer vectors than dimensions (a few clips, wide embeddings) it works on the vectors
    instead of the D x D covariances: with X, Y the centred sets, Σ1 Σ2 has the nonzero
    eigenvalues of (Y Xᵀ)(X Yᵀ) / c, so tr (Σ1 Σ2)^½ is the sum of singular values of X Yᵀ / √c,
    c = (n1 - 1)(n2 - 1). Same number, O(n² D) instead of O(D³): the bootstrap computes it
    hundreds of times.
    """
    (mu1, s1), (mu2, s2) = feature_stats(features_a), feature_stats(features_b)
    x, y = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    n1, n2, dims = len(x), len(y), x.shape[1]
    if y.shape[1] != dims:
        raise ValueError(f"frechet_distance_between: {dims} vs {y.shape[1]} feature dimensions")
    if max(n1, n2) > dims:
        return frechet_distance(mu1, s1, mu2, s2)
    xc, yc = x - mu1, y - mu2
    c = (n1 - 1) * (n2 - 1)
    nuclear = float(np.linalg.svd(xc @ yc.T, compute_uv=False).sum()) / np.sqrt(c)
    diff = mu1 - mu2
    fd = float(diff @ diff + (xc * xc).sum() / (n1 - 1) + (yc * yc).sum() / (n2 - 1) - 2.0 * nuclear)
    return max(fd, 0.0)
