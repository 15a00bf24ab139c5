"""Samplers on the model's own integer timesteps: "ddpm", "ddim" and "dpm_solver++".

Each walks indices t_0 > t_1 > ... of a schedule with t_prev = -1 for the final step to x0;
the model is called with its own timestep `schedule.timesteps[t]`:
  * "ddpm": ancestral p(x_{t-1}|x_t) on all T steps, or on the respaced schedule when
    `num_steps < T` (improved-diffusion's respacing).
  * "ddim": DDIM on a subsequence of the schedule (`spacing`), noise scaled by `eta`.
  * "dpm_solver++": DPM-Solver++(2M) (Lu et al. 2022), data prediction, a first-order warm-up
    step, `num_steps` model calls in all (the last one maps x at t = 0 to x0); its grid is
    uniform in log-SNR unless a `spacing` is given.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import (ddim_step as ddim_update, extract, mean_channels, p_sample_step,
                                     predict_x0_eps)
from diffusion_jax.errors import UsageError
from diffusion_jax.samplers.registry import (Grid, Sampler, check_num_steps, concrete_schedule, name,
                                             number, register, timesteps)
from diffusion_jax.schedules import SPACINGS, Schedule, respace, spaced_timesteps


def index_grid(schedule: Schedule, t: np.ndarray) -> Grid:
    """The grid of descending indices t [K] into `schedule`, ending at x0 (t_prev = -1)."""
    t = np.asarray(t, np.int64)
    t_prev = np.append(t[1:], -1)
    signal = np.append(np.asarray(schedule.sqrt_alphas_cumprod)[t], np.float32(1.0))
    noise = np.append(np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[t], np.float32(0.0))
    return Grid(schedule, {"t": t.astype(np.int32), "t_prev": t_prev.astype(np.int32)},
                np.asarray(schedule.timesteps)[t], signal, noise)


def _indices(schedule: Schedule, num_steps, spacing: str) -> np.ndarray:
    """`num_steps` indices of the schedule chosen by `spacing`, ascending."""
    T = schedule.num_timesteps
    return spaced_timesteps(T, check_num_steps(num_steps, T, f"a {T}-step schedule"), spacing)


def ddpm_grid(schedule, num_steps, spacing="linspace"):
    steps = schedule
    if num_steps != schedule.num_timesteps:
        steps = respace(concrete_schedule(schedule), _indices(schedule, num_steps, spacing))
    return index_grid(steps, np.arange(steps.num_timesteps)[::-1])


def _steps(inputs, x):
    B = x.shape[0]
    return jnp.full((B,), inputs["t"], jnp.int32), jnp.full((B,), inputs["t_prev"], jnp.int32)


def ddpm_step(ctx, x, state, inputs, key):
    t, _ = _steps(inputs, x)
    s = ctx.schedule
    out = ctx.model(x, s.timesteps[t])
    x0, _ = predict_x0_eps(s, mean_channels(out, x), x, t, ctx.prediction, ctx.clip_x0)
    x_prev = p_sample_step(s, out, x, t, ctx.normal(key), prediction=ctx.prediction,
                           variance=ctx.variance, clip_x0=ctx.clip_x0)
    return x_prev, state, x0


LAST_STEPS = ("x0", "t0")


def ddim_grid(schedule, num_steps, spacing="linspace", timesteps=None, last_step_to="x0"):
    """The indices chosen by `spacing` (or the given `timesteps`, noisiest first); the last step
    goes to x0 ("x0", diffusers' set_alpha_to_one=True) or to the level of index 0 ("t0",
    set_alpha_to_one=False, as Stable Diffusion's DDIM config has it)."""
    t = _given(schedule, num_steps, timesteps) if timesteps is not None else _indices(schedule, num_steps, spacing)[::-1]
    grid = index_grid(schedule, t)
    if last_step_to == "x0":
        return grid
    steps = dict(grid.steps, t_prev=np.append(grid.steps["t_prev"][:-1], 0).astype(np.int32))
    signal, noise = grid.signal.copy(), grid.noise.copy()
    signal[-1], noise[-1] = np.asarray(schedule.sqrt_alphas_cumprod)[0], np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[0]
    return Grid(schedule, steps, grid.model_t, signal, noise)


def _given(schedule: Schedule, num_steps, timesteps) -> np.ndarray:
    """Explicit timesteps, checked against the schedule and the step count."""
    t = np.asarray(timesteps, np.int64)
    if len(t) != num_steps:
        raise UsageError(f"{len(t)} timesteps given for num_steps = {num_steps}: give one per step")
    if t[0] >= schedule.num_timesteps:
        raise UsageError(f"timestep {t[0]} is outside the {schedule.num_timesteps}-step schedule")
    return t


def ddim_step(ctx, x, state, inputs, key):
    t, t_prev = _steps(inputs, x)
    s = ctx.schedule
    out = mean_channels(ctx.model(x, s.timesteps[t]), x)
    x0, _ = predict_x0_eps(s, out, x, t, ctx.prediction, ctx.clip_x0)
    x_prev = ddim_update(s, out, x, t, t_prev, ctx.normal(key), eta=ctx.options["eta"],
                         prediction=ctx.prediction, clip_x0=ctx.clip_x0)
    return x_prev, state, x0


def logsnr_uniform_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """About `num_steps` indices from 0 to T-1 evenly spaced in lambda = log(alpha / sigma)
    (DPM-Solver's grid for discrete-time models; sorted, unique, so possibly fewer)."""
    T = schedule.num_timesteps
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    abar = np.maximum(abar, 2.0 ** -24)  # zero terminal SNR: a finite lambda at t = T - 1
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
    if num_steps == 1:
        return np.array([T - 1])
    targets = np.linspace(lam[-1], lam[0], num_steps)
    # lam is decreasing: search the reversed (increasing) array for the nearest index.
    rev = lam[::-1]
    pos = np.clip(np.searchsorted(rev, targets), 1, T - 1)
    nearer_left = (targets - rev[pos - 1]) < (rev[pos] - targets)
    idx = T - 1 - (pos - nearer_left.astype(int))
    return np.unique(np.concatenate([[0, T - 1], idx]))


def dpm_grid(schedule, num_steps, spacing="logsnr"):
    if spacing != "logsnr":
        return ddim_grid(schedule, num_steps, spacing)
    T = schedule.num_timesteps
    num_steps = check_num_steps(num_steps, T, f"a {T}-step schedule")
    return index_grid(schedule, logsnr_uniform_timesteps(concrete_schedule(schedule), num_steps)[::-1])


def dpm_init(x):
    return {"x0": jnp.zeros(x.shape, jnp.float32), "h": jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1))}


def dpm_step(ctx, x, state, inputs, key):
    """One DPM-Solver++(2M) step in lambda = log(alpha / sigma); first order at the warm-up
    step, and for the last solver step of short runs (K < 15), as DPM-Solver's
    `lower_order_final`."""
    t, t_prev = _steps(inputs, x)
    s, n, i, K = ctx.schedule, x.ndim, inputs["i"], ctx.num_steps
    first = (i == 0) | ((K < 15) & (i == K - 2))
    out = mean_channels(ctx.model(x, s.timesteps[t]), x)
    x0, _ = predict_x0_eps(s, out, x, t, ctx.prediction, ctx.clip_x0)
    final = (t_prev < 0).reshape((-1,) + (1,) * (n - 1))
    tp = jnp.maximum(t_prev, 0)
    alpha_t, sigma_t = extract(s.sqrt_alphas_cumprod, t, n), extract(s.sqrt_one_minus_alphas_cumprod, t, n)
    alpha_p, sigma_p = extract(s.sqrt_alphas_cumprod, tp, n), extract(s.sqrt_one_minus_alphas_cumprod, tp, n)
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    h = jnp.log(alpha_p) - jnp.log(sigma_p) - lam_t
    r = state["h"] / h
    d2 = (1.0 + 0.5 / r) * x0 - (0.5 / r) * state["x0"]
    d = jnp.where(first, x0, d2)
    x_next = sigma_p / sigma_t * x - alpha_p * jnp.expm1(-h) * d
    x_next = jnp.where(final, x0, x_next)
    return x_next, {"x0": x0, "h": h}, x0


SPACING = name("linspace", SPACINGS)
register(Sampler("ddpm", ddpm_grid, ddpm_step, default_steps=lambda T: T, grid_options={"spacing": SPACING}))
register(Sampler("ddim", ddim_grid, ddim_step, default_steps=lambda T: min(T, 50),
                 grid_options={"spacing": SPACING, "timesteps": timesteps(), "last_step_to": name("x0", LAST_STEPS)},
                 step_options={"eta": number(0.0, minimum=0.0, maximum=1.0)}))
register(Sampler("dpm_solver++", dpm_grid, dpm_step, default_steps=lambda T: min(T, 20), init_state=dpm_init,
                 grid_options={"spacing": name("logsnr", ("logsnr", *SPACINGS))}))
