"""The exact likelihood of a process's probability-flow ODE (score_sde, Song et al. 2021, App. D.2):
log p_0(x) = log p_T(x_T) + integral from t_clean to t_noisy of div_x v(x_t, t) dt, where
dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat is the model's ODE, x_T its solution from
x, and p_T = N(0, prior_std^2). A DDPM schedule is taken in continuous time (its fractional
indices, the model fed fractional timesteps). Integrated with classical Runge-Kutta (4 model
evaluations a step) on the process's `likelihood_times`, in one `lax.scan`; the divergence exactly (one VJP per
dimension: for small data) or by Hutchinson's estimator (a Rademacher probe, one VJP).

Images dequantised as score_sde does: x in [-1, 1] from 256 levels plus uniform noise, so
bits/dim = -log p(x) / (D ln 2) + 7 (the Jacobian of [0, 256) -> [-1, 1]).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import draws
from diffusion_jax.errors import UsageError
from diffusion_jax.processes import as_process
from diffusion_jax.processes.targets import ode_velocity

DIVERGENCES = ("exact", "hutchinson")


def _velocity(denoise_fn, process, prediction):
    """v(x [B, ...], t scalar) -> dx/dt [B, ...] of the model's probability-flow ODE."""
    def v(x, t):
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        return ode_velocity(prediction, process, tb, x, denoise_fn(x, process.model_time(tb)))
    return v


def _divergence(v, x, t, divergence: str, probe):
    """(v(x, t), div_x v [B]); per example, the model being batch-wise independent. Reverse mode
    (a VJP a probe), which models with hand-written gradients (custom_vjp ops) support."""
    value, pullback = jax.vjp(lambda y: v(y, t), x)
    if divergence == "hutchinson":
        (row,) = pullback(probe)
        return value, jnp.sum((row * probe).reshape(x.shape[0], -1), axis=1)
    flat = x.reshape(x.shape[0], -1)

    def column(i, total):
        e = jnp.zeros_like(flat).at[:, i].set(1.0).reshape(x.shape)
        (row,) = pullback(e)
        return total + row.reshape(x.shape[0], -1)[:, i]

    return value, jax.lax.fori_loop(0, flat.shape[1], column, jnp.zeros((x.shape[0],), jnp.float32))


def ode_nll_bpd(denoise_fn: Callable, process, x, key=None, *, prediction: str = "eps", num_steps: int = 100,
                divergence: str = "exact", dequantize: bool = True):
    """Bits per dimension [B] of x [B, ...] (images in [-1, 1]) under the model's probability-flow
    ODE. `key` draws the dequantisation noise and the Hutchinson probe (needed for either);
    without `dequantize`, x is taken as continuous data and the +7 offset is left out."""
    process = as_process(process)
    if divergence not in DIVERGENCES:
        raise UsageError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if (dequantize or divergence == "hutchinson") and key is None:
        raise UsageError("give a key: it draws the dequantisation noise and the Hutchinson probe")
    x = jnp.asarray(x, jnp.float32)
    key_deq, key_probe = jax.random.split(key) if key is not None else (None, None)
    if dequantize:
        x = (jnp.round((x + 1.0) * 127.5) + draws.uniform(key_deq, x.shape)) / 128.0 - 1.0
    probe = (draws.rademacher(key_probe, x.shape).astype(jnp.float32) if divergence == "hutchinson"
             else None)
    ts = np.asarray(process.likelihood_times(int(num_steps)), np.float32)
    v = _velocity(denoise_fn, process, prediction)

    # Runge-Kutta's four stages as a scan over their coefficients: stage s evaluates the model at
    # x + a_s h k_{s-1} (the last at t_next itself) and adds b_s k_s; one model call in the program
    # instead of four, a smaller program to compile.
    stages = (jnp.asarray([0.0, 0.5, 0.5, 1.0], jnp.float32), jnp.asarray([1.0, 2.0, 2.0, 1.0], jnp.float32),
              jnp.asarray([False, False, False, True]))

    def rk4(state, step):
        t, t_next = step
        h = t_next - t
        x_, logdet = state

        def stage(carry, coefficients):
            k, sum_dx, sum_div = carry
            a, b, last = coefficients
            dx, div = _divergence(v, x_ + a * h * k, jnp.where(last, t_next, t + a * h), divergence, probe)
            return (dx, sum_dx + b * dx, sum_div + b * div), None

        zeros = jnp.zeros_like(x_)
        (_, sum_dx, sum_div), _ = jax.lax.scan(stage, (zeros, zeros, jnp.zeros_like(logdet)), stages)
        return (x_ + h / 6.0 * sum_dx, logdet + h / 6.0 * sum_div), None

    (x_T, integral), _ = jax.lax.scan(rk4, (x, jnp.zeros((x.shape[0],), jnp.float32)),
                                      (jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])))
    dim = int(np.prod(x.shape[1:]))
    std = float(process.prior_std)
    flat = x_T.reshape(x.shape[0], -1)
    log_prior = -0.5 * jnp.sum(flat ** 2, axis=1) / std ** 2 - dim * (0.5 * math.log(2 * math.pi) + math.log(std))
    log_p = log_prior + integral
    bpd = -log_p / (dim * math.log(2.0))
    return bpd + 7.0 if dequantize else bpd
