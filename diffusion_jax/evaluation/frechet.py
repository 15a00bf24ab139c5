"""Frechet distance between Gaussians fitted to features (the FID formula), and the statistics
files (`.npz` with `mu` and `sigma`, as pytorch-fid writes them)."""
from __future__ import annotations

import pathlib
from typing import NamedTuple

import numpy as np

from diffusion_jax.errors import UsageError


def feature_statistics(features: np.ndarray):
    """(mu [D], sigma [D, D]) in float64 of features [N, D] (unbiased covariance)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UsageError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class FeatureSums(NamedTuple):
    """What feature statistics pool from, in float64: the count, the sum [D] and the sum of outer
    products [D, D]. These add exactly across shards and processes; means and covariances of
    parts do not."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    def __add__(self, other: "FeatureSums") -> "FeatureSums":
        return FeatureSums(self.count + other.count, self.total + other.total, self.outer + other.outer)


def feature_sums(features: np.ndarray) -> FeatureSums:
    features = np.asarray(features, np.float64)
    return FeatureSums(len(features), features.sum(axis=0), features.T @ features)


def statistics_from_sums(sums: FeatureSums):
    """(mu, sigma) as `feature_statistics` gives them, from pooled sums (unbiased covariance)."""
    n = sums.count
    if n < 2:
        raise UsageError(f"statistics need at least 2 images, got {n}")
    mu = sums.total / n
    return mu, (sums.outer - n * np.outer(mu, mu)) / (n - 1)


def _square_root_factor(sigma: np.ndarray) -> np.ndarray:
    """F [D, r] with F F^T = sigma for a symmetric PSD sigma [D, D]: its eigenvectors scaled by the
    square roots of the eigenvalues above round-off (numpy's matrix_rank tolerance, max |w| D eps),
    so r is sigma's numerical rank."""
    w, v = np.linalg.eigh(sigma)
    keep = w > np.abs(w).max(initial=0.0) * len(w) * np.finfo(w.dtype).eps
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    With S1 = F1 F1^T, S1 S2 = F1 (F1^T S2 F1) F1^T has the nonzero eigenvalues of the symmetric PSD
    F1^T S2 F1 [r, r], so Tr (S1 S2)^(1/2) is the sum of their square roots. One eigendecomposition
    of S1 and the eigenvalues of an r x r matrix: exact for singular covariances (fewer samples than
    features, r < D) where scipy's sqrtm, pytorch-fid's choice, needs an eps on the diagonal; at
    D = 2048 on one core 3.0 s where two eigendecompositions and an SVD took 5.8 s and sqrtm 13 s
    (1.4 s against 5.9 s with 6 images on one side; BENCHMARKS.md).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UsageError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise UsageError("the covariances are not finite (non-finite features?)")
    diff = mu1 - mu2
    factor = _square_root_factor(sigma1)
    inner = np.linalg.eigvalsh(factor.T @ sigma2 @ factor)
    trace_sqrt = np.sqrt(np.clip(inner, 0.0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def save_statistics(path, mu, sigma) -> str:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return str(path)


def check_statistics(mu, sigma, where: str):
    """(mu [D], sigma [D, D]) as float64 after checking they can be Gaussian statistics: finite,
    sigma square, symmetric and positive semi-definite (to round-off); else a ValueError naming
    `where` and what is wrong."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise UsageError(f"{where}: mu and sigma must be numeric arrays, got {mu.dtype} and {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UsageError(f"{where}: mu must be [D] and sigma [D, D], got shapes {mu.shape} and {sigma.shape}")
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            raise UsageError(f"{where}: {name} has {np.size(value) - np.isfinite(value).sum()} non-finite "
                             "value(s) (NaN or inf): the statistics are damaged; make them again with fid-stats")
    scale = max(float(np.abs(sigma).max()), 1e-30)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise UsageError(f"{where}: sigma is not symmetric, so it is no covariance; make the statistics again "
                         "with fid-stats")
    lowest = float(np.linalg.eigvalsh(sigma).min())
    if lowest < -1e-6 * scale * len(mu):
        raise UsageError(f"{where}: sigma is not positive semi-definite (an eigenvalue of {lowest:.4g}), so it is "
                         "no covariance; make the statistics again with fid-stats")
    return mu, sigma


def load_statistics(path):
    """(mu [D], sigma [D, D]) float64 of a statistics file (`.npz` with `mu` and `sigma`), checked
    by `check_statistics`; a missing, unreadable or damaged file is an error that names it."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no statistics file {path}: write it with "
                                "`python -m diffusion_jax fid-stats --dataset NAME --split train --out FILE`")
    fix = "give the .npz that `python -m diffusion_jax fid-stats` (or pytorch-fid) writes, or make it again"
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # not an .npy/.npz at all, truncated, a pickle
        raise UsageError(f"{path} cannot be read as NumPy statistics ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'}): {fix}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} holds one array, not the 'mu' and 'sigma' of an .npz: {fix}")
    with loaded as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise UsageError(f"{path} has no 'mu' and 'sigma' arrays (it has {sorted(f.files)}): {fix}")
        try:
            mu, sigma = f["mu"], f["sigma"]
        except Exception as error:  # a damaged member: bad CRC, truncated, a pickled object
            raise UsageError(f"{path} is damaged ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'no details'}): {fix}") from None
    return check_statistics(mu, sigma, str(path))
