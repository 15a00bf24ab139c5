"""Samplers in sigma space (Karras et al. 2022, k-diffusion) for any discrete-time model:
"euler", "heun", "euler_ancestral", "dpm++_2m" and "dpm++_2m_sde".

The model is seen as a denoiser D(x; sigma) of the variance-exploding state x = x0 + sigma eps,
with sigma_t = sqrt((1 - abar_t) / abar_t): the model gets the input x / sqrt(sigma^2 + 1) (the
variance-preserving x_t) and the (fractional) timestep whose sigma this is, found by linear
interpolation in log sigma between the schedule's integer timesteps (k-diffusion's discrete
wrapper, diffusers' `_sigma_to_t`). eps, x0 and v predictions all give D.

The grid (`sigmas`): "karras" (rho = 7 between the schedule's sigma_min and sigma_max),
"exponential" (uniform in log sigma) or "model" (the model's timesteps chosen by `spacing`, as
diffusers' Euler scheduler with `timestep_spacing`); each ends at sigma = 0. A zero-terminal-SNR
schedule has sigma_max = inf: its abar is held at 2^-24 here, as diffusers does.

The driver carries the variance-preserving x_t between steps; each step converts.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.diffusion import mean_channels
from diffusion_jax.processes.ddpm import MIN_ABAR  # where abar_T = 0 (zero terminal SNR): sigma_max 4096
from diffusion_jax.samplers.registry import (Grid, Sampler, check_num_steps, concrete_schedule, name,
                                             number, register, timesteps)
from diffusion_jax.schedules import SPACINGS, Schedule, spaced_timesteps

SIGMA_GRIDS = ("karras", "exponential", "model")


def schedule_sigmas(schedule: Schedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) [T] in float64, increasing in t."""
    abar = np.maximum(np.cumprod(1.0 - np.asarray(schedule.betas, np.float64)), MIN_ABAR)
    return np.sqrt((1.0 - abar) / abar)


def sigma_to_t(sigma, log_sigmas, xp=np):
    """The fractional timestep of `sigma`: linear in log sigma between the integer timesteps
    whose log sigmas are `log_sigmas` [T] (increasing), clipped to [0, T - 1]."""
    log_sigma = xp.log(xp.maximum(sigma, 1e-10))
    return xp.interp(log_sigma, log_sigmas, xp.arange(len(log_sigmas), dtype=log_sigmas.dtype))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho) (EDM eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_grid(schedule: Schedule, num_steps, sigmas: str = "karras", spacing: str = "linspace",
               rho: float = 7.0, timesteps=None) -> Grid:
    """The grid of K = num_steps sigmas (and their model timesteps), then sigma = 0; with
    `timesteps` (sigmas="model"), the sigmas of those model timesteps, noisiest first."""
    if sigmas not in SIGMA_GRIDS:
        raise UsageError(f"unknown sigmas {sigmas!r}; choose one of {SIGMA_GRIDS}")
    if spacing != "linspace" and sigmas != "model":
        raise UsageError(f"spacing {spacing!r} chooses the model's timesteps: it needs sigmas='model' "
                         f"(got sigmas={sigmas!r})")
    if rho != 7.0 and sigmas != "karras":
        raise UsageError(f"rho shapes the Karras grid: it needs sigmas='karras' (got sigmas={sigmas!r})")
    if timesteps is not None and sigmas != "model":
        raise UsageError(f"timesteps are the model's own: they need sigmas='model' (got sigmas={sigmas!r})")
    T = schedule.num_timesteps
    K = check_num_steps(num_steps, T, f"a {T}-step schedule")
    table = schedule_sigmas(concrete_schedule(schedule))
    log_table = np.log(table)
    if timesteps is not None:
        t = np.asarray(timesteps, np.float64)
        if len(t) != K or t[0] > T - 1:
            raise UsageError(f"timesteps {list(timesteps)} do not fit num_steps = {K} on a {T}-step schedule")
        sig = np.interp(t, np.arange(T), table)
    elif sigmas == "model":
        if spacing == "linspace":  # fractional, as diffusers' Euler schedulers
            t = np.linspace(0.0, T - 1.0, K)[::-1]
        else:
            t = spaced_timesteps(T, K, spacing)[::-1].astype(np.float64)
        sig = np.interp(t, np.arange(T), table)
    else:
        sig = (karras_sigmas(table[0], table[-1], K, rho) if sigmas == "karras"
               else exponential_sigmas(table[0], table[-1], K))
        t = sigma_to_t(sig, log_table)
    sig_all = np.append(sig, 0.0)
    scale = 1.0 / np.sqrt(sig_all ** 2 + 1.0)
    steps = {"sigma": sig_all[:-1], "sigma_next": sig_all[1:], "t": t, "t_next": np.append(t[1:], 0.0)}
    return Grid(schedule, {k: v.astype(np.float32) for k, v in steps.items()}, t.astype(np.float32),
                scale.astype(np.float32), (sig_all * scale).astype(np.float32))


def denoised(ctx, x, sigma, t):
    """D: the model's estimate of x0 [B, ...] from the variance-preserving x_t = x [B, ...] at
    noise level `sigma` (scalar) and model timestep t (scalar), clipped with `clip_x0`."""
    alpha = jax.lax.rsqrt(sigma * sigma + 1.0)
    out = mean_channels(ctx.model(x, jnp.full((x.shape[0],), t, jnp.float32)), x)
    if ctx.prediction == "eps":
        x0 = (x - sigma * alpha * out) / alpha
    elif ctx.prediction == "v":
        x0 = alpha * x - sigma * alpha * out
    else:
        x0 = out
    return jnp.clip(x0, -1.0, 1.0) if ctx.clip_x0 else x0


def _to_ve(x, sigma):
    return x * jnp.sqrt(sigma * sigma + 1.0)


def _to_vp(x, sigma):
    return x * jax.lax.rsqrt(sigma * sigma + 1.0)


def _log_sigmas(ctx):
    abar = jnp.maximum(ctx.schedule.alphas_cumprod, MIN_ABAR)
    return 0.5 * (jnp.log1p(-abar) - jnp.log(abar))


def _churn(ctx, x_ve, sigma, t, key):
    """EDM's stochastic churn: raise sigma to sigma_hat = sigma (1 + gamma) by adding noise,
    gamma = min(s_churn / K, sqrt(2) - 1) inside [s_tmin, s_tmax], else 0 (then no change)."""
    o = ctx.options
    inside = (o["s_tmin"] <= sigma) & (sigma <= o["s_tmax"])
    gamma = jnp.where(inside, jnp.minimum(o["s_churn"] / ctx.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    noise = ctx.normal(key) * o["s_noise"]
    x_hat = x_ve + noise * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0))
    t_hat = jnp.where(gamma > 0, sigma_to_t(sigma_hat, _log_sigmas(ctx), jnp), t)
    return x_hat, sigma_hat, t_hat


def _derivative(ctx, x_ve, sigma, t):
    x0 = denoised(ctx, _to_vp(x_ve, sigma), sigma, t)
    return (x_ve - x0) / sigma, x0


def euler_step(ctx, x, state, inputs, key):
    """x_next = x + (sigma_next - sigma_hat) d, d = (x - D(x; sigma_hat)) / sigma_hat."""
    sigma, sigma_next = inputs["sigma"], inputs["sigma_next"]
    x_hat, sigma_hat, t_hat = _churn(ctx, _to_ve(x, sigma), sigma, inputs["t"], key)
    d, x0 = _derivative(ctx, x_hat, sigma_hat, t_hat)
    return _to_vp(x_hat + (sigma_next - sigma_hat) * d, sigma_next), state, x0


def heun_step(ctx, x, state, inputs, key):
    """EDM Algorithm 2: an Euler step corrected by the slope at its end (trapezoid rule); the
    last step, to sigma = 0, stays an Euler step (one model call fewer)."""
    sigma, sigma_next = inputs["sigma"], inputs["sigma_next"]
    x_hat, sigma_hat, t_hat = _churn(ctx, _to_ve(x, sigma), sigma, inputs["t"], key)
    d, x0 = _derivative(ctx, x_hat, sigma_hat, t_hat)
    dt = sigma_next - sigma_hat
    x_euler = x_hat + dt * d

    def corrected(x_euler):
        d_next, _ = _derivative(ctx, x_euler, sigma_next, inputs["t_next"])
        return x_hat + dt * 0.5 * (d + d_next)

    x_next = jax.lax.cond(sigma_next > 0, corrected, lambda x_euler: x_euler, x_euler)
    return _to_vp(x_next, sigma_next), state, x0


def euler_ancestral_step(ctx, x, state, inputs, key):
    """An Euler step down to sigma_down, then fresh noise of scale sigma_up, where
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    sigma_down^2 = sigma_next^2 - sigma_up^2 (the ancestral step of k-diffusion, eta = 1)."""
    sigma, sigma_next = inputs["sigma"], inputs["sigma_next"]
    d, x0 = _derivative(ctx, _to_ve(x, sigma), sigma, inputs["t"])
    sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
    x_next = _to_ve(x, sigma) + (sigma_down - sigma) * d + ctx.normal(key) * sigma_up
    return _to_vp(x_next, sigma_next), state, x0


def dpmpp_2m_init(x):
    return {"x0": jnp.zeros(x.shape, jnp.float32), "h": jnp.ones((), jnp.float32)}


def dpmpp_2m_step(ctx, x, state, inputs, key, sde: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022) on the sigma grid, in lambda = log(alpha / sigma):
    first order at the first step and at the last (to sigma = 0, where it returns D), second
    order in between from the current and previous D. With `sde`, the SDE variant
    (DPM-Solver++(2M) SDE): the deterministic part shrinks by exp(-h) and fresh noise of
    variance sigma_next^2 (1 - exp(-2h)) comes in (in variance-preserving terms)."""
    sigma, sigma_next = inputs["sigma"], inputs["sigma_next"]
    x0 = denoised(ctx, x, sigma, inputs["t"])
    alpha_s = jax.lax.rsqrt(sigma * sigma + 1.0)
    alpha_t = jax.lax.rsqrt(sigma_next * sigma_next + 1.0)
    h = jnp.log(sigma) - jnp.log(sigma_next)  # lambda_t - lambda_s (inf at sigma_next = 0)
    r = state["h"] / h
    first = (inputs["i"] == 0) | (sigma_next == 0)
    d = jnp.where(first, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * state["x0"])
    ratio = (sigma_next * alpha_t) / (sigma * alpha_s)
    if not sde:
        x_next = ratio * x - alpha_t * jnp.expm1(-h) * d
    else:
        x_next = (ratio * jnp.exp(-h) * x - alpha_t * jnp.expm1(-2.0 * h) * d
                  + sigma_next * alpha_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * ctx.normal(key))
    return x_next, {"x0": x0, "h": h}, x0


SIGMA_GRID_OPTIONS = {"sigmas": name("karras", SIGMA_GRIDS), "spacing": name("linspace", SPACINGS),
                      "rho": number(7.0, minimum=0.0, open_below=True), "timesteps": timesteps()}
CHURN_OPTIONS = {"s_churn": number(0.0, minimum=0.0), "s_tmin": number(0.0, minimum=0.0),
                 "s_tmax": number(float("inf"), minimum=0.0, infinite=True), "s_noise": number(1.0, minimum=0.0)}

register(Sampler("euler", sigma_grid, euler_step, default_steps=lambda T: 50,
                 grid_options=SIGMA_GRID_OPTIONS, step_options=CHURN_OPTIONS))
register(Sampler("heun", sigma_grid, heun_step, default_steps=lambda T: 18,
                 grid_options=SIGMA_GRID_OPTIONS, step_options=CHURN_OPTIONS,
                 model_calls=lambda k: 2 * k - 1))
register(Sampler("euler_ancestral", sigma_grid, euler_ancestral_step, default_steps=lambda T: 50,
                 grid_options=SIGMA_GRID_OPTIONS))
register(Sampler("dpm++_2m", sigma_grid, dpmpp_2m_step, default_steps=lambda T: 20,
                 init_state=dpmpp_2m_init, grid_options=SIGMA_GRID_OPTIONS))
register(Sampler("dpm++_2m_sde", sigma_grid, functools.partial(dpmpp_2m_step, sde=True),
                 default_steps=lambda T: 20, init_state=dpmpp_2m_init, grid_options=SIGMA_GRID_OPTIONS))
