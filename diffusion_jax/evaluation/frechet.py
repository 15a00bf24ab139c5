"""Frechet distance between Gaussians fitted to features (the FID formula), and the statistics
files (`.npz` with `mu` and `sigma`, as pytorch-fid writes them)."""
from __future__ import annotations

import pathlib
import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray):
    """(mu [D], sigma [D, D]) in float64 of features [N, D] (unbiased covariance)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The square root is scipy's sqrtm; when S1 S2 is near-singular (few samples) it is retried
    with eps added to both diagonals, as pytorch-fid does; a tiny imaginary part from round-off
    is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all() or np.abs(np.imag(covmean)).max() > 1e-3:
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix "
                             "square root: the covariances are badly conditioned (use more samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def save_statistics(path, mu, sigma) -> str:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return str(path)


def load_statistics(path):
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no statistics file {path}: write it with "
                                "`python -m diffusion_jax fid-stats --dataset NAME --split train --out FILE`")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (a pytorch-fid style .npz is expected)")
        return f["mu"], f["sigma"]
