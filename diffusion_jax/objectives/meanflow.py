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
    tangent: iMF (Geng et al. 2025b) differentiates along the model's own velocity u(z_t, t, t) (stop-
            gradient) instead of the sample's v, so that u + (t - r) du/dt, regressed on v, is a function
            of z_t alone; `model_tangent` m in [0, 1] takes (1 - m) v + m u(z_t, t, t) (0: MeanFlow's, 1: iMF's).

Classifier-free guidance folded into the target (the paper's section 4.2 and appendix): the sample's
velocity v is replaced by the guided field

    v_g = w v + (1 - w - kappa) u(z_t, t, t | null) + kappa u(z_t, t, t | c)     (through a stop-gradient)

(`guidance` w, `guidance_mix` kappa; within the times [`guidance_t_min`, `guidance_t_max`], v outside),
both in the tangent and in the target. Its fixed point at r = t is the guided velocity
v_null + s (v_c - v_null) of scale s = w / (1 - kappa), so the trained model samples guided in one
evaluation with no guidance at sampling (scale 1). Examples whose condition was dropped (the null's
own training) keep v; a run needs a condition and `train.cond_dropout` > 0.

The model sees both times in its model-time units: `model_fn(z, model_time(t), r=model_time(r))`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import mean_flat
from diffusion_jax.errors import UsageError
from diffusion_jax.objectives.path import continuous_process, path_point
from diffusion_jax.processes.times import sample_times

OPTIONS = {"ratio": (0.25, 0.0, 1.0), "time_mean": (-0.4, -math.inf, math.inf), "time_std": (1.0, 1e-6, math.inf),
           "adaptive_p": (1.0, 0.0, math.inf), "adaptive_c": (1e-3, 1e-12, math.inf),
           "guidance": (1.0, 0.0, math.inf), "guidance_mix": (0.0, 0.0, 0.999),
           "guidance_t_min": (0.0, -math.inf, math.inf), "guidance_t_max": (1.0, -math.inf, math.inf),
           "model_tangent": (0.0, 0.0, 1.0)}  # (default, low, high)


class Unconditional(NamedTuple):
    """What guidance folded into the target needs of a conditional batch: `model_fn` the model with the
    null condition (the same signature as the conditional one) and `dropped` [B] bool, the examples
    whose condition was dropped to the null."""
    model_fn: Callable
    dropped: jax.Array


def folds_guidance(options: dict) -> bool:
    """Whether MeanFlow's options fold classifier-free guidance into its target."""
    return options.get("guidance", 1.0) != 1.0 or options.get("guidance_mix", 0.0) != 0.0


def two_times(process, key, batch: int, ratio: float, time_mean: float, time_std: float):
    """(t, r) [batch] each: logit-normal times on the process's training times, t >= r, r = t but
    for a `ratio` of the batch."""
    key_t, key_r, key_mask = jax.random.split(key, 3)
    a, b = (sample_times(process, k, batch, "logit_normal", mean=time_mean, std=time_std) for k in (key_t, key_r))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    return t, jnp.where(jax.random.bernoulli(key_mask, ratio, (batch,)), r, t)


def meanflow_loss(model_fn: Callable, process, x0, key, *, prediction: str = "velocity", ratio: float = 0.25,
                  time_mean: float = -0.4, time_std: float = 1.0, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                  guidance: float = 1.0, guidance_mix: float = 0.0, guidance_t_min: float = 0.0,
                  guidance_t_max: float = 1.0, model_tangent: float = 0.0, unconditional: Unconditional | None = None):
    """The MeanFlow loss on a batch x0 [B, ...] of a continuous process; `model_fn(z, model time t [B],
    r=model time r [B])` -> u [B, ...] (`prediction` "velocity": the average one). With `guidance` or
    `guidance_mix` set, `unconditional` gives the null-conditioned model and the dropped examples.
    Returns (loss, aux) as `losses.training_loss`: the batch mean and per-example "t", "r", "mse" (the
    unweighted squared error's mean) and "loss"."""
    if prediction != "velocity":
        raise UsageError(f"objective 'meanflow' trains a model of the average velocity: prediction 'velocity', not "
                         f"{prediction!r}")
    process = continuous_process("meanflow", process)
    key_t, key_noise = jax.random.split(key)
    x0 = jnp.asarray(x0, jnp.float32)
    t, r = two_times(process, key_t, x0.shape[0], ratio, time_mean, time_std)
    z, v = path_point(process, x0, t, key_noise)

    def average_velocity(z, r, t, model_fn=model_fn):
        return jnp.asarray(model_fn(z, process.model_time(t), r=process.model_time(r)), jnp.float32)

    per_image = (-1,) + (1,) * (x0.ndim - 1)
    velocity = lambda fn=model_fn: jax.lax.stop_gradient(average_velocity(z, t, t, fn))  # u(z, t, t): the velocity
    own = velocity() if guidance_mix or model_tangent else None
    if folds_guidance({"guidance": guidance, "guidance_mix": guidance_mix}):
        if unconditional is None:
            raise UsageError("MeanFlow's guidance folded into its target (options guidance, guidance_mix) needs a "
                             "conditional run trained with the null condition: set a condition and train.cond_dropout > 0")
        inside = ((t >= guidance_t_min) & (t <= guidance_t_max)).reshape(per_image)
        w, kappa = jnp.where(inside, guidance, 1.0), jnp.where(inside, guidance_mix, 0.0)
        null_velocity = velocity(unconditional.model_fn)
        guided = w * v + (1.0 - w) * null_velocity
        if guidance_mix:
            guided += kappa * (own - null_velocity)
        v = jnp.where(unconditional.dropped.reshape(per_image), v, guided)

    tangent = (1.0 - model_tangent) * v + model_tangent * own if model_tangent else v
    u, du_dt = jax.jvp(average_velocity, (z, r, t), (tangent, jnp.zeros_like(r), jnp.ones_like(t)))
    gap = (t - r).reshape(per_image)
    error = u - jax.lax.stop_gradient(v - gap * du_dt)
    squared = jnp.sum(error ** 2, axis=tuple(range(1, x0.ndim)))
    per_example = jax.lax.stop_gradient(1.0 / (squared + adaptive_c) ** adaptive_p) * squared
    return jnp.mean(per_example), {"t": t, "r": r, "mse": mean_flat(error ** 2), "loss": per_example}
