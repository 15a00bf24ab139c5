"""The reverse process from noise to data: every sampler is one `lax.scan` over its steps.

`sample(denoise_fn, schedule, shape, key, ...)` is pure; jit it with the model, schedule and
shape closed over (they fix the program) and everything users sweep as traced arguments:

    sampler = jax.jit(functools.partial(sample, denoise_fn, schedule, shape, method="ddim",
                                        num_steps=50))
    x0 = sampler(key, eta=0.5)           # a new key or eta: same compiled program

Static (change the program): `denoise_fn`, `schedule`, `shape`, `method`, `num_steps`,
`prediction`, `variance`, `clip_x0`, `start_step`, `trajectory_every`, `repaint_resamples`,
`sharding`, and whether `cond`/`known`/`start_x`/`x_T` are given. Traced: `key`, `eta`,
`guidance_scale`, `cond`, `null_cond`, `known`, `mask`, `start_x`, `x_T`.

Every method walks a grid of indices into a schedule, t_0 > t_1 > ... with t_prev = -1 for the
final step to x0; the model is always called with its own timestep `schedule.timesteps[t]`:
  * "ddpm": ancestral p(x_{t-1}|x_t) on all T steps, or on the respaced schedule when
    `num_steps < T` (improved-diffusion's respacing).
  * "ddim": DDIM on an evenly spaced subsequence of the full schedule, noise scaled by `eta`.
  * "dpm_solver++": DPM-Solver++(2M) (Lu et al. 2022), data prediction, a first-order warm-up
    step, `num_steps` model calls in all (the last one maps x at t = 0 to x0).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import (ddim_step, extract, mean_channels, p_sample_step,
                                     predict_x0_eps, q_sample, q_step_sample, split_model_output)
from diffusion_jax.schedules import Schedule, evenly_spaced_timesteps, respace

METHODS = ("ddpm", "ddim", "dpm_solver++")


def _concrete_schedule(schedule: Schedule) -> Schedule:
    try:
        np.asarray(schedule.betas)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            "the schedule is traced: close over it (functools.partial(sample, denoise_fn, "
            "schedule, shape, ...)) instead of passing it as a jit argument, so the step grid "
            "can be computed in float64 at trace time") from None
    return schedule


def sampling_grid(schedule: Schedule, method: str, num_steps: int | None,
                  start_step: int | None = None):
    """(schedule to step on, t [K], t_prev [K]) as NumPy int arrays, t descending, t_prev = -1
    at the last step. `start_step` (a model timestep) drops the steps above it (SDEdit)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    T = schedule.num_timesteps
    if num_steps is None:
        num_steps = T if method == "ddpm" else min(T, {"ddim": 50, "dpm_solver++": 20}[method])
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}] for a {T}-step schedule, got {num_steps}")
    if method == "ddpm":
        steps = schedule if num_steps == T else respace(_concrete_schedule(schedule), num_steps)
        t = np.arange(steps.num_timesteps)[::-1]
    elif method == "ddim":
        steps = schedule
        t = evenly_spaced_timesteps(T, num_steps)[::-1]
    else:
        steps = schedule
        t = logsnr_uniform_timesteps(_concrete_schedule(schedule), num_steps)[::-1]
    if start_step is not None:
        model_t = np.asarray(_concrete_schedule(steps).timesteps)[t]
        t = t[model_t <= start_step]
        if t.size == 0:
            raise ValueError(f"start_step {start_step} is below the first sampling step")
    t_prev = np.append(t[1:], -1)
    return steps, t, t_prev


def logsnr_uniform_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """About `num_steps` indices from 0 to T-1 evenly spaced in lambda = log(alpha / sigma)
    (DPM-Solver's grid for discrete-time models; sorted, unique, so possibly fewer)."""
    T = schedule.num_timesteps
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
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


def guided_denoise_fn(denoise_fn: Callable, cond=None, null_cond=None, guidance_scale=None,
                      variance: str = "fixed_small") -> Callable:
    """denoise_fn(x, t[, cond]) as a function of (x, t) with classifier-free guidance.

    With `guidance_scale` s the conditional and the null-label batches go through the model in
    one call and out = out_uncond + s (out_cond - out_uncond) on the mean channels (for eps, x0
    or v alike, each linear in eps at fixed x_t); a learned variance is the conditional one.
    """
    if guidance_scale is None:
        if cond is None:
            return denoise_fn
        return lambda x, t: denoise_fn(x, t, cond)
    if cond is None or null_cond is None:
        raise ValueError("guidance_scale needs both cond (labels) and null_cond (the null label)")

    def guided(x, t):
        batch = x.shape[0]
        null = jnp.broadcast_to(jnp.asarray(null_cond, jnp.asarray(cond).dtype), jnp.shape(cond))
        out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([cond, null]))
        out_c, out_u = out[:batch], out[batch:]
        mean_c, var_c = split_model_output(out_c, x, variance)
        mean_u, _ = split_model_output(out_u, x, variance)
        mean = mean_u + guidance_scale * (mean_c - mean_u)
        return mean if var_c is None else jnp.concatenate([mean, var_c], axis=-1)

    return guided


def _dpm_solver_step(s, out, x, t, t_prev, state, first, prediction, clip_x0):
    """One DPM-Solver++(2M) step in lambda = log(alpha / sigma); first order when `first`
    (the warm-up step, and the last solver step of short runs, as DPM-Solver's
    `lower_order_final`)."""
    n = x.ndim
    x0, _ = predict_x0_eps(s, out, x, t, prediction, clip_x0)
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


def sample(denoise_fn: Callable, schedule: Schedule, shape, key, *, method: str = "ddpm",
           num_steps: int | None = None, eta=0.0, prediction: str = "eps",
           variance: str = "fixed_small", clip_x0: bool = True, guidance_scale=None, cond=None,
           null_cond=None, known=None, mask=None, repaint_resamples: int = 1, start_x=None,
           start_step: int | None = None, x_T=None, trajectory_every: int | None = None,
           sharding=None):
    """Generates a batch x0 of `shape` ([B, H, W, C]) by running the reverse chain.

    Args:
      denoise_fn: (x_t, t_model) -> model output, or (x_t, t_model, cond) when `cond` is given.
      known, mask: inpainting; after every step the pixels with mask = 1 are replaced by
        q_sample(known, t_prev) (by `known` itself at the end). `repaint_resamples` r > 1
        re-noises x_{t_prev} back to x_t r - 1 times per step (RePaint, jump length 1; ddpm).
      start_x, start_step: image-to-image (SDEdit): start_x noised to the grid's first step at
        or below model timestep `start_step`, then the chain from there.
      x_T: the starting noise (default: drawn from `key`); the DDIM decoder of `encode`.
      trajectory_every: also return {"x_t", "pred_x0": [N, *shape], "t": [N]}, the state before
        every k-th step and the final sample (N = ceil(K / k) + 1 for K steps).
      sharding: a `jax.sharding.Sharding` for [B, ...] arrays (batch on a data axis); the noise
        is drawn as one global array, so every device gets its own noise and the result equals
        the unsharded one for the same key.
    Returns:
      x0 [B, ...] float32 (and the trajectory dict when `trajectory_every` is set).
    """
    shape = tuple(shape)
    steps, t_seq, t_prev_seq = sampling_grid(schedule, method, num_steps, start_step)
    model = guided_denoise_fn(denoise_fn, cond, null_cond, guidance_scale, variance)
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both known (the image) and mask (1 = keep)")
    if repaint_resamples > 1 and (known is None or method != "ddpm"):
        raise ValueError("repaint_resamples > 1 needs method='ddpm' with known and mask")
    if start_x is not None and start_step is None:
        raise ValueError("start_x (SDEdit) needs start_step, the timestep to noise it to")
    constrain = (lambda a: a) if sharding is None else (
        lambda a: jax.lax.with_sharding_constraint(a, sharding))
    normal = lambda k: constrain(jax.random.normal(k, shape, jnp.float32))
    B = shape[0]
    K = len(t_seq)

    key_init, key_steps = jax.random.split(key)
    if x_T is not None:
        x = constrain(jnp.asarray(x_T, jnp.float32).reshape(shape))
    elif start_x is not None:
        x = q_sample(steps, constrain(start_x.astype(jnp.float32)),
                     jnp.full((B,), t_seq[0]), normal(key_init))
    else:
        x = normal(key_init)

    def merge_known(x_prev, t_prev, k):
        if known is None:
            return x_prev
        noised = q_sample(steps, known.astype(jnp.float32), jnp.maximum(t_prev, 0), normal(k))
        noised = jnp.where(t_prev < 0, known.astype(jnp.float32), noised)
        return mask * noised + (1.0 - mask) * x_prev

    def one_step(x, t, t_prev, state, first, k):
        tt = jnp.full((B,), t, jnp.int32)
        tp = jnp.full((B,), t_prev, jnp.int32)
        out = model(x, steps.timesteps[tt])
        k_noise, k_known = jax.random.split(k)
        noise = normal(k_noise)
        mean_out = mean_channels(out, x)
        if method == "dpm_solver++":
            x_prev, state, x0 = _dpm_solver_step(steps, mean_out, x, tt, tp, state, first,
                                                 prediction, clip_x0)
        else:
            x0, _ = predict_x0_eps(steps, mean_out, x, tt, prediction, clip_x0)
            if method == "ddpm":
                x_prev = p_sample_step(steps, out, x, tt, noise, prediction=prediction,
                                       variance=variance, clip_x0=clip_x0)
            else:
                x_prev = ddim_step(steps, mean_out, x, tt, tp, noise, eta=eta, prediction=prediction,
                                   clip_x0=clip_x0)
        return merge_known(x_prev, t_prev, k_known), state, x0

    def first_order(i):
        # DPM-Solver++: first order to warm up, and for the final solver step when K < 15.
        return (i == 0) | ((K < 15) & (i == K - 2))

    def body(carry, inputs):
        x, state = carry
        i, t, t_prev = inputs
        k = jax.random.fold_in(key_steps, i)
        if repaint_resamples > 1:
            def resample(j, x_cur):
                x_prev, _, _ = one_step(x_cur, t, t_prev, state, first_order(i), jax.random.fold_in(k, j))
                return q_step_sample(steps, x_prev, jnp.full((B,), t, jnp.int32),
                                     normal(jax.random.fold_in(jax.random.fold_in(k, j), 7)))
            x = jax.lax.fori_loop(0, repaint_resamples - 1, resample, x)
            k = jax.random.fold_in(k, repaint_resamples)
        x_prev, state, x0 = one_step(x, t, t_prev, state, first_order(i), k)
        return (x_prev, state), (x, x0)

    state = {"x0": jnp.zeros(shape, jnp.float32), "h": jnp.ones((B,) + (1,) * (len(shape) - 1))} \
        if method == "dpm_solver++" else {}
    if known is not None and x_T is None and start_x is None:
        x = merge_known(x, jnp.int32(t_seq[0]), jax.random.fold_in(key_init, 1))

    if trajectory_every is None:
        def body_no_traj(carry, inputs):
            carry, _ = body(carry, inputs)
            return carry, None
        (x, _), _ = jax.lax.scan(body_no_traj, (x, state),
                                 (jnp.arange(K), jnp.asarray(t_seq), jnp.asarray(t_prev_seq)))
        return x

    # Keep only every k-th state in a buffer carried through the scan (never all K states).
    every = int(trajectory_every)
    saved = -(-K // every)
    buffers = (jnp.zeros((saved + 1,) + shape, jnp.float32), jnp.zeros((saved + 1,) + shape, jnp.float32))

    def body_traj(carry, inputs):
        (x, state), (buf_x, buf_x0) = carry
        i = inputs[0]
        (x_prev, state), (x_before, x0) = body((x, state), inputs)
        write = i % every == 0
        slot = i // every
        buf_x = buf_x.at[slot].set(jnp.where(write, x_before, buf_x[slot]))
        buf_x0 = buf_x0.at[slot].set(jnp.where(write, x0, buf_x0[slot]))
        return ((x_prev, state), (buf_x, buf_x0)), None

    ((x, _), (buf_x, buf_x0)), _ = jax.lax.scan(
        body_traj, ((x, state), buffers),
        (jnp.arange(K), jnp.asarray(t_seq), jnp.asarray(t_prev_seq)))
    buf_x, buf_x0 = buf_x.at[saved].set(x), buf_x0.at[saved].set(x)
    model_t = steps.timesteps[jnp.asarray(t_seq[::every])]
    return x, {"x_t": buf_x, "pred_x0": buf_x0, "t": jnp.append(model_t, -1)}


def encode(denoise_fn: Callable, schedule: Schedule, x0, num_steps: int = 50, *,
           prediction: str = "eps", cond=None):
    """DDIM inversion: runs the deterministic DDIM update forward from x0 to x_{T-1}.

    The grid is the one `sample(method="ddim", num_steps=num_steps)` walks down, so
    `decode(denoise_fn, schedule, encode(...), num_steps)` returns x0 up to the discretisation
    error, which falls as `num_steps` grows. x0 [B, ...] -> x_T [B, ...].
    """
    _, t_desc, _ = sampling_grid(schedule, "ddim", num_steps)
    grid = t_desc[::-1]
    model = guided_denoise_fn(denoise_fn, cond)
    B = x0.shape[0]

    def body(x, inputs):
        t, t_next = inputs
        tt = jnp.full((B,), t, jnp.int32)
        out = model(x, schedule.timesteps[tt])
        mean_out = mean_channels(out, x)
        x0_hat, eps = predict_x0_eps(schedule, mean_out, x, tt, prediction, clip_x0=False)
        tn = jnp.full((B,), t_next, jnp.int32)
        return q_sample(schedule, x0_hat, tn, eps), None

    x = x0.astype(jnp.float32)
    if len(grid) > 1:
        x, _ = jax.lax.scan(body, x, (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])))
    return x


def decode(denoise_fn: Callable, schedule: Schedule, x_T, num_steps: int = 50, *,
           prediction: str = "eps", cond=None):
    """Deterministic DDIM (eta = 0, no clipping) from a given x_T: the inverse of `encode`."""
    return sample(denoise_fn, schedule, x_T.shape, jax.random.key(0), method="ddim",
                  num_steps=num_steps, eta=0.0, prediction=prediction, clip_x0=False, cond=cond,
                  x_T=x_T)
