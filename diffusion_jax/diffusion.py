"""The Gaussian diffusion maths as pure functions of a `Schedule` and arrays.

Conventions (the README's "The functional API"):
  * x0, x_t, noise: [B, ...] (images NHWC in [-1, 1]); t: int [B] (or a scalar, broadcast) with
    0 <= t < T. Per-example coefficients broadcast over the non-batch axes.
  * A model enters only as its output (`model_output`, same shape as x_t, or twice the channels
    on the last axis with `variance="learned_range"`) or as `denoise_fn(x_t, t_model)`, where
    `t_model = schedule.timesteps[t]` is the timestep the model was trained with.
  * `prediction` in {"eps", "x0", "v"} says what the model output means.
  * Tables are gathered with `gather`: an out-of-range t under `jit` (negative t included) gives
    NaN, never a silently clamped or wrapped-around neighbour. Concrete (non-traced) t is checked eagerly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


# ---------------------------------------------------------------------------- checks & gathers
def _concrete_value(x):
    """x as a NumPy array, or None when x is traced (inside jit/vmap/grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_timesteps(t, batch: int, num_timesteps: int, name: str = "t") -> jnp.ndarray:
    """Returns t as int32 [batch] (a scalar is broadcast); ValueError on a bad shape/range."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise UsageError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise UsageError(f"{name} must have shape [B] = ({batch},) or be a scalar, got {t.shape}")
    tn = _concrete_value(t)
    if tn is not None:
        if tn.size and (tn.min() < 0 or tn.max() >= num_timesteps):
            raise UsageError(
                f"{name} out of range: timesteps must lie in [0, {num_timesteps}), got values in "
                f"[{tn.min()}, {tn.max()}]")
    return t.astype(jnp.int32)


def check_same_shape(**arrays) -> None:
    """ValueError naming the arguments whose shapes differ."""
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise UsageError(f"shape mismatch: {desc} must all have the same shape")


def gather(table: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """table[t], NaN wherever t lies outside [0, T) -- negative t included, which plain
    indexing (and take's fill mode) would wrap around to the end of the table."""
    t = jnp.asarray(t)
    outside = (t < 0) | (t >= table.shape[0])
    return jnp.take(table, jnp.where(outside, table.shape[0], t), axis=0, mode="fill", fill_value=jnp.nan)


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """table[t] reshaped to [B, 1, ..., 1] (ndim axes) to broadcast against [B, ...] arrays."""
    values = gather(table, t)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _prepare(s: Schedule, x: jnp.ndarray, t, name: str = "t"):
    if jnp.ndim(x) < 1:
        raise UsageError(f"x must have a batch axis, got shape {jnp.shape(x)}")
    return check_timesteps(t, x.shape[0], s.num_timesteps, name)


def _check_option(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; choose one of {allowed}")


def mean_flat(x):
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------- forward process
def q_mean_variance(s: Schedule, x0, t):
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
    t = _prepare(s, x0, t)
    n = x0.ndim
    mean = extract(s.sqrt_alphas_cumprod, t, n) * x0
    variance = jnp.broadcast_to(extract(s.sqrt_one_minus_alphas_cumprod, t, n) ** 2, x0.shape)
    log_variance = jnp.broadcast_to(extract(s.log_one_minus_alphas_cumprod, t, n), x0.shape)
    return mean, variance, log_variance


def q_sample(s: Schedule, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise [B, ...], t [B]."""
    check_same_shape(x0=x0, noise=noise)
    t = _prepare(s, x0, t)
    n = x0.ndim
    return (extract(s.sqrt_alphas_cumprod, t, n) * x0
            + extract(s.sqrt_one_minus_alphas_cumprod, t, n) * noise)


def q_posterior(s: Schedule, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log-variance), each [B, ...]."""
    check_same_shape(x0=x0, x_t=x_t)
    t = _prepare(s, x_t, t)
    n = x_t.ndim
    mean = extract(s.posterior_mean_coef1, t, n) * x0 + extract(s.posterior_mean_coef2, t, n) * x_t
    variance = jnp.broadcast_to(extract(s.posterior_variance, t, n), x_t.shape)
    log_variance = jnp.broadcast_to(extract(s.posterior_log_variance_clipped, t, n), x_t.shape)
    return mean, variance, log_variance


def q_step_sample(s: Schedule, x_prev, t, noise):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) noise: one forward step q(x_t | x_{t-1}) from
    index t - 1 to t (RePaint's re-noising). x_prev, noise [B, ...], t [B]."""
    check_same_shape(x_prev=x_prev, noise=noise)
    t = _prepare(s, x_prev, t)
    n = x_prev.ndim
    return jnp.sqrt(extract(s.alphas, t, n)) * x_prev + jnp.sqrt(extract(s.betas, t, n)) * noise


# ---------------------------------------------------------------------------- conversions
def x0_from_eps(s: Schedule, x_t, t, eps):
    """x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps."""
    t = _prepare(s, x_t, t)
    n = x_t.ndim
    return extract(s.sqrt_recip_alphas_cumprod, t, n) * x_t - extract(s.sqrt_recipm1_alphas_cumprod, t, n) * eps


def eps_from_x0(s: Schedule, x_t, t, x0):
    """eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1)."""
    t = _prepare(s, x_t, t)
    n = x_t.ndim
    return ((extract(s.sqrt_recip_alphas_cumprod, t, n) * x_t - x0)
            / extract(s.sqrt_recipm1_alphas_cumprod, t, n))


def v_from_x0_eps(s: Schedule, x0, eps, t):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    t = _prepare(s, x0, t)
    n = x0.ndim
    return extract(s.sqrt_alphas_cumprod, t, n) * eps - extract(s.sqrt_one_minus_alphas_cumprod, t, n) * x0


def x0_from_v(s: Schedule, x_t, t, v):
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    t = _prepare(s, x_t, t)
    n = x_t.ndim
    return extract(s.sqrt_alphas_cumprod, t, n) * x_t - extract(s.sqrt_one_minus_alphas_cumprod, t, n) * v


def eps_from_v(s: Schedule, x_t, t, v):
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    t = _prepare(s, x_t, t)
    n = x_t.ndim
    return extract(s.sqrt_one_minus_alphas_cumprod, t, n) * x_t + extract(s.sqrt_alphas_cumprod, t, n) * v


def split_model_output(model_output, x_t, variance: str):
    """(mean part, variance part or None): learned_range outputs 2C channels on the last axis."""
    _check_option("variance", variance, VARIANCES)
    if variance == "learned_range":
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * x_t.shape[-1]:
            raise UsageError(
                f"model_output shape {model_output.shape} must be x_t shape {x_t.shape} with twice "
                "the channels (last axis) when variance='learned_range'")
        return jnp.split(model_output, 2, axis=-1)
    if model_output.shape != x_t.shape:
        raise UsageError(
            f"model_output shape {model_output.shape} must equal x_t shape {x_t.shape} with "
            f"variance={variance!r} (use 'learned_range' for a model with 2C output channels)")
    return model_output, None


def mean_channels(model_output, x_t):
    """The mean part of a model output [B, ..., C] or [B, ..., 2C]: all of it when it has x_t's
    shape, the first C channels of a learned-variance output (improved DDPM's layout)."""
    if model_output.shape == x_t.shape:
        return model_output
    return split_model_output(model_output, x_t, "learned_range")[0]


def predict_x0_eps(s: Schedule, output, x_t, t, prediction: str = "eps", clip_x0: bool = False):
    """(x0, eps) implied by the model's mean output under `prediction`.

    With `clip_x0`, x0 is clipped to [-1, 1] and eps recomputed from the clipped x0, so the
    pair stays consistent with x_t (as improved-diffusion's DDIM does).
    """
    _check_option("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        eps = output
        x0 = x0_from_eps(s, x_t, t, eps)
    elif prediction == "x0":
        x0 = output
        eps = eps_from_x0(s, x_t, t, x0)
    else:
        x0 = x0_from_v(s, x_t, t, output)
        eps = eps_from_v(s, x_t, t, output)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = eps_from_x0(s, x_t, t, x0)
    return x0, eps


# ---------------------------------------------------------------------------- reverse process
class MeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, variance); each field [B, ...]."""

    mean: jnp.ndarray
    variance: jnp.ndarray
    log_variance: jnp.ndarray
    pred_x0: jnp.ndarray


def model_log_variance(s: Schedule, var_output, x_t, t, variance: str):
    """log sigma_t^2 of p(x_{t-1}|x_t), [B, ...]; var_output is the learned part (or None)."""
    n = x_t.ndim
    if variance == "fixed_small":  # beta tilde_t (log clipped at t = 0)
        log_var = extract(s.posterior_log_variance_clipped, t, n)
    elif variance == "fixed_large":  # beta_t, with beta tilde_1 at t = 0 as in DDPM
        first = s.posterior_variance[1] if s.num_timesteps > 1 else s.betas[0]
        log_var = jnp.log(extract(s.betas.at[0].set(first), t, n))
    else:  # improved DDPM: interpolate log beta tilde_t and log beta_t with v in [-1, 1]
        min_log = extract(s.posterior_log_variance_clipped, t, n)
        max_log = extract(jnp.log(s.betas), t, n)
        frac = (var_output.astype(jnp.float32) + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    return jnp.broadcast_to(log_var, x_t.shape)


def p_mean_variance(s: Schedule, model_output, x_t, t, *, prediction: str = "eps",
                    variance: str = "fixed_small", clip_x0: bool = True) -> MeanVariance:
    """Mean, variance, log-variance of p(x_{t-1} | x_t) and the predicted x0."""
    t = _prepare(s, x_t, t)
    mean_out, var_out = split_model_output(model_output, x_t, variance)
    pred_x0, _ = predict_x0_eps(s, mean_out, x_t, t, prediction, clip_x0)
    mean, _, _ = q_posterior(s, pred_x0, x_t, t)
    log_var = model_log_variance(s, var_out, x_t, t, variance)
    return MeanVariance(mean, jnp.exp(log_var), log_var, pred_x0)


def p_sample_step(s: Schedule, model_output, x_t, t, noise, *, prediction: str = "eps",
                  variance: str = "fixed_small", clip_x0: bool = True):
    """One ancestral step x_{t-1} = mean + sigma_t * noise, with the noise masked where t == 0."""
    check_same_shape(x_t=x_t, noise=noise)
    t = _prepare(s, x_t, t)
    out = p_mean_variance(s, model_output, x_t, t, prediction=prediction, variance=variance,
                          clip_x0=clip_x0)
    nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise


def ddim_step(s: Schedule, model_output, x_t, t, t_prev, noise, *, eta=0.0,
              prediction: str = "eps", clip_x0: bool = True):
    """DDIM update from index t to index t_prev < t (Song et al. 2021, eq. 12).

    t_prev = -1 means the last step, to x0 (abar_prev = 1). `eta` (traced) scales the noise:
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
    eta = 0 is deterministic, eta = 1 with t_prev = t - 1 has DDPM's posterior variance.
    A learned-variance output is accepted; its variance half is ignored.
    """
    check_same_shape(x_t=x_t, noise=noise)
    t = _prepare(s, x_t, t)
    t_prev = jnp.asarray(t_prev, dtype=jnp.int32)
    t_prev = jnp.broadcast_to(t_prev, t.shape)
    x0, eps = predict_x0_eps(s, mean_channels(model_output, x_t), x_t, t, prediction, clip_x0)
    n = x_t.ndim
    prev_ok = (t_prev >= 0).reshape((-1,) + (1,) * (n - 1))
    t_prev = jnp.maximum(t_prev, 0)
    # 1 - abar from the float64-derived sqrt table: 1.0 - abar in float32 cancels near t = 0.
    one_minus_t = extract(s.sqrt_one_minus_alphas_cumprod, t, n) ** 2
    one_minus_prev = jnp.where(prev_ok, extract(s.sqrt_one_minus_alphas_cumprod, t_prev, n) ** 2, 0.0)
    abar_prev = jnp.where(prev_ok, extract(s.alphas_cumprod, t_prev, n), 1.0)
    # 1 - abar_t / abar_prev without cancellation: near abar = 1 as a difference of the
    # accurate (1 - abar) values, elsewhere from the ratio itself.
    abar_t = extract(s.alphas_cumprod, t, n)
    step_var = jnp.where(abar_prev > 0.5, (one_minus_t - one_minus_prev) / abar_prev,
                         1.0 - abar_t / abar_prev)
    step_var = jnp.maximum(step_var, 0.0)
    sigma = eta * jnp.sqrt(one_minus_prev / one_minus_t * step_var)
    mean = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0)) * eps
    return mean + sigma * noise
