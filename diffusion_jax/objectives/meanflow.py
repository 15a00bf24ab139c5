"""MeanFlow (Geng et al. 2025): a two-time model u(z, r, t) of the average velocity between times
r <= t of a continuous process, u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds, so that one jump
z_r = z_t - (t - r) u(z_t, r, t) follows the probability-flow ODE (the sampler `meanflow`).

Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt, with
du/dt = v d_z u + d_t u the total derivative along the path: one `jax.jvp` of u with tangent
(v, 0, 1). The loss regresses u_theta(z_t, r, t) on the stop-gradient target v - (t - r) du_theta/dt,
v the sample's own velocity alpha'(t) x0 + sigma'(t) eps; at r = t it is flow matching's loss.

    (t, r): two logit-normal times (SD3's sampler, `time_mean`, `time_std`), t the larger, r set to t
            except for a fraction `ratio` of the batch (the paper's 25%);
    weight: the adaptive 1 / (||err||^2 + c)^p through a stop-gradient (p = 1, c = 1e-3: the paper's);
            p = 0 is the plain squared error, whose gradient vanishes in expectation at the exact u.

The model sees both times in its model-time units: `model_fn(z, model_time(t), r=model_time(r))`.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import mean_flat
from diffusion_jax.errors import UsageError
from diffusion_jax.objectives.path import continuous_process, path_point
from diffusion_jax.processes.times import sample_times

OPTIONS = {"ratio": (0.25, 0.0, 1.0), "time_mean": (-0.4, -math.inf, math.inf), "time_std": (1.0, 1e-6, math.inf),
           "adaptive_p": (1.0, 0.0, math.inf), "adaptive_c": (1e-3, 1e-12, math.inf)}  # (default, low, high)


def two_times(process, key, batch: int, ratio: float, time_mean: float, time_std: float):
    """(t, r) [batch] each: logit-normal times on the process's training times, t >= r, r = t but
    for a `ratio` of the batch."""
    key_t, key_r, key_mask = jax.random.split(key, 3)
    a, b = (sample_times(process, k, batch, "logit_normal", mean=time_mean, std=time_std) for k in (key_t, key_r))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    return t, jnp.where(jax.random.bernoulli(key_mask, ratio, (batch,)), r, t)


def meanflow_loss(model_fn: Callable, process, x0, key, *, prediction: str = "velocity", ratio: float = 0.25,
                  time_mean: float = -0.4, time_std: float = 1.0, adaptive_p: float = 1.0, adaptive_c: float = 1e-3):
    """The MeanFlow loss on a batch x0 [B, ...] of a continuous process; `model_fn(z, model time t [B],
    r=model time r [B])` -> u [B, ...] (`prediction` "velocity": the average one). Returns (loss, aux)
    as `losses.training_loss`: the batch mean and per-example "t", "r", "mse" (the unweighted squared
    error's mean) and "loss"."""
    if prediction != "velocity":
        raise UsageError(f"objective 'meanflow' trains a model of the average velocity: prediction 'velocity', not "
                         f"{prediction!r}")
    process = continuous_process("meanflow", process)
    key_t, key_noise = jax.random.split(key)
    x0 = jnp.asarray(x0, jnp.float32)
    t, r = two_times(process, key_t, x0.shape[0], ratio, time_mean, time_std)
    z, v = path_point(process, x0, t, key_noise)

    def average_velocity(z, r, t):
        return jnp.asarray(model_fn(z, process.model_time(t), r=process.model_time(r)), jnp.float32)

    u, du_dt = jax.jvp(average_velocity, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    gap = (t - r).reshape((-1,) + (1,) * (x0.ndim - 1))
    error = u - jax.lax.stop_gradient(v - gap * du_dt)
    squared = jnp.sum(error ** 2, axis=tuple(range(1, x0.ndim)))
    per_example = jax.lax.stop_gradient(1.0 / (squared + adaptive_c) ** adaptive_p) * squared
    return jnp.mean(per_example), {"t": t, "r": r, "mse": mean_flat(error ** 2), "loss": per_example}
