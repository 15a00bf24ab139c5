"""Continuous-time consistency training (Song et al. 2023; Lu & Song 2024, sCM; Geng et al. 2024,
ECT) on a continuous process: the consistency function f(x_t, t) is the model's x0 (its output
through `prediction`: for flow's velocity f = x_t - t F, so f(x, 0) = x), and it should be constant
along each probability-flow ODE trajectory, the ODE map to t = 0.

The discrete consistency loss ||f(x_t, t) - f(x_r, r)||^2 / (t - r), with x_r taken from the same
x0 and noise, has the gradient 2 (d_theta f)^T df/dt as r -> t, df/dt = v d_x f + d_t f the total
derivative along the sample's own velocity v = alpha'(t) x0 + sigma'(t) eps: one `jax.jvp` with
tangent (v, 1). So the loss here is ||f(x_t, t) - stop_gradient(f(x_t, t) - g)||^2, g = df/dt
normalised by (||df/dt|| + `tangent_c`) (sCM's tangent normalisation; tangent_c = 0: none): its
gradient is that one (twice) and its value ||g||^2 >= 0. As df/dt is linear in v and E[v | x_t] is
the ODE's velocity, the gradient vanishes in expectation at the exact consistency function (with
tangent_c = 0); the value does not (v's own variance remains). aux "mse" is the mean square of
df/dt.

Times: logit-normal (`time_mean`, `time_std`) on the process's training times.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import mean_flat
from diffusion_jax.objectives.path import continuous_process, path_point
from diffusion_jax.processes.targets import from_prediction, levels
from diffusion_jax.processes.times import sample_times

OPTIONS = {"time_mean": (0.0, -math.inf, math.inf), "time_std": (1.0, 1e-6, math.inf),
           "tangent_c": (0.1, 0.0, math.inf)}  # (default, low, high)


def consistency_loss(model_fn: Callable, process, x0, key, *, prediction: str = "velocity", time_mean: float = 0.0,
                     time_std: float = 1.0, tangent_c: float = 0.1):
    """The continuous-time consistency loss on a batch x0 [B, ...] of a continuous process;
    `model_fn(x_t, model time [B])` -> the output of `prediction`. Returns (loss, aux) as
    `losses.training_loss`: "t", "mse" (mean square of df/dt) and "loss" per example."""
    process = continuous_process("consistency", process)
    key_t, key_noise = jax.random.split(key)
    x0 = jnp.asarray(x0, jnp.float32)
    t = sample_times(process, key_t, x0.shape[0], "logit_normal", mean=time_mean, std=time_std)
    x_t, v = path_point(process, x0, t, key_noise)

    def consistency_function(x, t):
        at = levels(process, t, x, derivatives=prediction == "velocity")
        return from_prediction(prediction, at, x, model_fn(x, process.model_time(t)))[0]

    f, df_dt = jax.jvp(consistency_function, (x_t, t), (v, jnp.ones_like(t)))
    axes = tuple(range(1, x0.ndim))
    norm = jnp.sqrt(jnp.sum(df_dt ** 2, axis=axes, keepdims=True))
    tangent = jax.lax.stop_gradient(df_dt / (norm + tangent_c) if tangent_c > 0 else df_dt)
    per_example = jnp.sum((f - jax.lax.stop_gradient(f - tangent)) ** 2, axis=axes)  # value ||g||^2, gradient 2 g d f
    return jnp.mean(per_example), {"t": t, "mse": mean_flat(df_dt ** 2), "loss": per_example}
