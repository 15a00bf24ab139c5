"""Noise-prediction metrics on a held-out split, for any process, on a fixed, seeded set of
(x0, t, noise), so two checkpoints are compared on identical inputs.

The times are spread evenly over the process's range (`process.spread_times`: DDPM's t_i =
floor(i T / N); t itself on [0, 1] for "vp" and "flow"; log-uniform sigma for "edm"), then
shuffled with the seed; the `num_buckets` buckets hold equal numbers of them, in time order.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from diffusion_jax.processes import as_process
from diffusion_jax.processes.targets import from_prediction, levels, mean_channels, prediction_target


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """MSE, RMSE, MAE and R^2 = 1 - SS_res / SS_tot over all elements (float64)."""
    pred, true = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    err = pred - true
    mse = float(np.mean(err**2))
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(err))),
            "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan")}


def evaluation_inputs(process, x0: np.ndarray, num_examples: int, seed: int):
    """The fixed (x0, t, noise) triples: x0 cycled through the split, t evenly spread, shuffled."""
    rng = np.random.default_rng(seed)
    idx = np.arange(num_examples) % len(x0)
    t = rng.permutation(np.asarray(as_process(process).spread_times(num_examples)))
    noise = rng.standard_normal((num_examples, *x0.shape[1:])).astype(np.float32)
    return x0[idx].astype(np.float32), t.astype(np.int32 if t.dtype.kind == "i" else np.float32), noise


def time_buckets(t: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket index in [0, num_buckets) of each time: equal counts, in time order."""
    order = np.argsort(np.argsort(t, kind="stable"), kind="stable")
    return np.minimum(order * num_buckets // len(t), num_buckets - 1)


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


def prediction_metrics(denoise_fn: Callable, process, x0: np.ndarray, *, num_examples: int = 512,
                       seed: int = 1234, num_buckets: int = 10, prediction: str = "eps",
                       batch_size: int = 256) -> dict:
    """{"noise_mse", "noise_rmse", "noise_mae", "noise_r2", "per_timestep": [...]} of the eps the
    model's output implies (so runs of any objective compare), and "target_*" of its own target
    (`prediction`), on the fixed evaluation set built from held-out images x0 [N, H, W, C]; each
    bucket of "per_timestep" has its time range ("t_min", "t_max": the process's times)."""
    process = as_process(process)
    x0_e, t, noise = evaluation_inputs(process, np.asarray(x0), num_examples, seed)

    @jax.jit
    def one_batch(x0_b, t_b, noise_b):
        lv = levels(process, t_b, x0_b, derivatives=prediction == "velocity")
        x_t = lv.alpha * x0_b + lv.sigma * noise_b
        out = mean_channels(denoise_fn(x_t, process.model_time(t_b)), x_t)
        return from_prediction(prediction, lv, x_t, out)[1], out, prediction_target(prediction, lv, x0_b, noise_b)

    eps, outs, targets = batched(one_batch, (x0_e, t, noise), min(batch_size, num_examples))
    overall, own = regression_metrics(eps, noise), regression_metrics(outs, targets)
    buckets = time_buckets(t, num_buckets)
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
