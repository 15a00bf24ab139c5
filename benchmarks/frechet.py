"""The Frechet distance at Inception's D = 2048: `frechet_distance` against the two
eigendecompositions and SVD it replaced and scipy's sqrtm (pytorch-fid's formula), on ReLU features
of a fixed random mixing (full rank from 6,000 draws, rank 5 from 6). Prints each value and time.

    OMP_NUM_THREADS=1 python -m benchmarks.frechet [--dim 2048]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from diffusion_jax.evaluation.frechet import feature_statistics, frechet_distance


def two_factors_and_svd(mu1, sigma1, mu2, sigma2) -> float:
    """The previous formula: Tr (S1 S2)^(1/2) as the singular values of F1^T F2, F = V sqrt(W)."""
    def factor(sigma):
        w, v = np.linalg.eigh(sigma)
        return v * np.sqrt(np.clip(w, 0.0, None))

    diff = mu1 - mu2
    trace_sqrt = np.linalg.svd(factor(sigma1).T @ factor(sigma2), compute_uv=False).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def by_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    from scipy import linalg

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(linalg.sqrtm(sigma1 @ sigma2).real))


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    dim = p.parse_args(argv).dim
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    features = lambda n, shift=0.0: np.maximum(rng.standard_normal((n, dim)) @ mix + shift, 0.0)  # noqa: E731
    full, other, few = feature_statistics(features(6000)), feature_statistics(features(6000, 0.05)), \
        feature_statistics(features(6))
    cases = {"full rank": (full, other, True), "6 images against full rank": (few, full, False),
             "6 images against themselves": (few, few, False)}
    for name, (a, b, with_sqrtm) in cases.items():
        line = f"{name}: " + ", ".join(f"{label} {value:.9g} ({seconds:.2f} s)" for label, (value, seconds) in (
            ("frechet_distance", timed(frechet_distance, *a, *b)),
            ("two eigh + svd", timed(two_factors_and_svd, *a, *b)),
            *((("sqrtm", timed(by_sqrtm, *a, *b)),) if with_sqrtm else ())))
        print(line, flush=True)


if __name__ == "__main__":
    main()
