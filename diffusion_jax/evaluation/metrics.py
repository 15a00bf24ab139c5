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


def batched(fn: Callable, arrays, batch_size: int) -> tuple:
    """fn(*batch) over `arrays` ([N, ...] each) in batches of `batch_size`, the last one padded
    with copies of its last row (one compiled shape), the outputs (a tuple) concatenated."""
    n, outputs = len(arrays[0]), []
    for start in range(0, n, batch_size):
        parts = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - len(parts[0])
        if pad:
            parts = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in parts]
        outputs.append([np.asarray(o)[: batch_size - pad] for o in fn(*parts)])
    return tuple(np.concatenate(column) for column in zip(*outputs))


def predict_noise(denoise_fn: Callable, schedule: Schedule, x0, t, noise, *, prediction="eps",
                  batch_size: int = 256) -> np.ndarray:
    """The model's eps prediction for each (x0, t, noise), batched; [N, ...] float32."""
    @jax.jit
    def one_batch(x0_b, t_b, noise_b):
        x_t = q_sample(schedule, x0_b, t_b, noise_b)
        out = mean_channels(denoise_fn(x_t, schedule.timesteps[t_b]), x_t)
        return (predict_x0_eps(schedule, out, x_t, t_b, prediction)[1],)

    return batched(one_batch, (x0, t, noise), batch_size)[0]


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


# ---------------------------------------------------------------------------- continuous processes
def evaluation_times(process, num_examples: int, seed: int) -> np.ndarray:
    """float32 [N] times spread evenly over the process's range, then shuffled: u = (i + 1/2) / N
    is t itself on [0, 1] ("vp", "flow") and log-uniform sigma on [sigma_min, sigma_max] ("edm")."""
    u = (np.arange(num_examples) + 0.5) / num_examples
    return np.random.default_rng([seed, 1]).permutation(process.spread_time(u)).astype(np.float32)


def process_prediction_metrics(denoise_fn: Callable, process, x0: np.ndarray, *, num_examples: int = 512,
                               seed: int = 1234, num_buckets: int = 10, prediction: str = "eps",
                               batch_size: int = 256) -> dict:
    """The metrics of `noise_prediction_metrics` for a continuous process: "noise_*" of the eps the
    model's output implies (so runs of any objective compare), "target_*" of its own target
    (`prediction`), per bucket of evaluation time ("t_min", "t_max": times, or sigmas)."""
    from diffusion_jax.processes import from_prediction, prediction_target
    from diffusion_jax.processes.targets import coefficients

    x0_e, _, noise = evaluation_inputs(np.asarray(x0), 1, num_examples, seed)
    t = evaluation_times(process, num_examples, seed)

    @jax.jit
    def one_batch(x0_b, t_b, noise_b):
        alpha, sigma = coefficients(process, t_b, x0_b)
        x_t = alpha * x0_b + sigma * noise_b
        out = denoise_fn(x_t, process.model_time(t_b))
        return from_prediction(prediction, process, t_b, x_t, out)[1], out, prediction_target(prediction, process, t_b, x0_b, noise_b)

    eps, outs, targets = batched(one_batch, (x0_e, t, noise), min(batch_size, num_examples))
    overall, own = regression_metrics(eps, noise), regression_metrics(outs, targets)
    order = np.argsort(np.argsort(t))  # rank of each time: buckets of equal counts, in time order
    buckets = np.minimum(order * num_buckets // num_examples, num_buckets - 1)
    per_t = []
    for b in range(num_buckets):
        sel = buckets == b
        row = {"t_min": float(t[sel].min()) if sel.any() else float("nan"),
               "t_max": float(t[sel].max()) if sel.any() else float("nan"), "count": int(sel.sum())}
        if sel.any():
            row.update(regression_metrics(eps[sel], noise[sel]))
        per_t.append(row)
    return {"noise_mse": overall["mse"], "noise_rmse": overall["rmse"], "noise_mae": overall["mae"],
            "noise_r2": overall["r2"], "target": prediction, "target_mse": own["mse"], "target_rmse": own["rmse"],
            "target_mae": own["mae"], "target_r2": own["r2"], "num_examples": int(num_examples), "seed": int(seed),
            "process": process.name, "per_timestep": per_t}
