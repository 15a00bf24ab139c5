"""Noise-prediction metrics on a held-out split, on a fixed, seeded set of (x0, t, noise), so two
checkpoints are compared on identical inputs.

The timesteps are spread evenly over [0, T) (t_i = floor(i T / N), then shuffled with the
seed), so each of the `num_buckets` equal ranges of t gets the same number of examples.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from diffusion_jax.diffusion import mean_channels, predict_x0_eps, q_sample
from diffusion_jax.schedules import Schedule


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """MSE, RMSE, MAE and R^2 = 1 - SS_res / SS_tot over all elements (float64)."""
    pred, true = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    err = pred - true
    mse = float(np.mean(err**2))
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(err))),
            "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan")}


def evaluation_inputs(x0: np.ndarray, num_timesteps: int, num_examples: int, seed: int):
    """The fixed (x0, t, noise) triples: x0 cycled through the split, t evenly spread."""
    rng = np.random.default_rng(seed)
    idx = np.arange(num_examples) % len(x0)
    t = (np.arange(num_examples) * num_timesteps) // num_examples
    t = rng.permutation(t).astype(np.int32)
    noise = rng.standard_normal((num_examples, *x0.shape[1:])).astype(np.float32)
    return x0[idx].astype(np.float32), t, noise


def timestep_buckets(t: np.ndarray, num_timesteps: int, num_buckets: int) -> np.ndarray:
    """Bucket index in [0, num_buckets) of each t: equal ranges of [0, T)."""
    return np.minimum((np.asarray(t) * num_buckets) // num_timesteps, num_buckets - 1)


def predict_noise(denoise_fn: Callable, schedule: Schedule, x0, t, noise, *, prediction="eps",
                  batch_size: int = 256) -> np.ndarray:
    """The model's eps prediction for each (x0, t, noise), batched; [N, ...] float32."""
    @jax.jit
    def one_batch(x0_b, t_b, noise_b):
        x_t = q_sample(schedule, x0_b, t_b, noise_b)
        out = mean_channels(denoise_fn(x_t, schedule.timesteps[t_b]), x_t)
        return predict_x0_eps(schedule, out, x_t, t_b, prediction)[1]

    preds = []
    n = len(x0)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        pad = batch_size - len(x0[sl])
        pad_fn = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a
        preds.append(np.asarray(one_batch(pad_fn(x0[sl]), pad_fn(t[sl]), pad_fn(noise[sl])))[: batch_size - pad])
    return np.concatenate(preds)


def noise_prediction_metrics(denoise_fn: Callable, schedule: Schedule, x0: np.ndarray, *,
                             num_examples: int = 512, seed: int = 1234, num_buckets: int = 10,
                             prediction: str = "eps", batch_size: int = 256) -> dict:
    """{"noise_mse", "noise_rmse", "noise_mae", "noise_r2", "per_timestep": [...]} on the fixed
    evaluation set built from held-out images x0 [N, H, W, C]."""
    T = schedule.num_timesteps
    x0_e, t, noise = evaluation_inputs(np.asarray(x0), T, num_examples, seed)
    pred = predict_noise(denoise_fn, schedule, x0_e, t, noise, prediction=prediction,
                         batch_size=min(batch_size, num_examples))
    overall = regression_metrics(pred, noise)
    buckets = timestep_buckets(t, T, num_buckets)
    per_t = []
    for b in range(num_buckets):
        sel = buckets == b
        row = {"t_min": int(b * T // num_buckets), "t_max": int((b + 1) * T // num_buckets - 1),
               "count": int(sel.sum())}
        if sel.any():
            row.update(regression_metrics(pred[sel], noise[sel]))
        per_t.append(row)
    return {"noise_mse": overall["mse"], "noise_rmse": overall["rmse"], "noise_mae": overall["mae"],
            "noise_r2": overall["r2"], "num_examples": int(num_examples), "seed": int(seed),
            "per_timestep": per_t}
