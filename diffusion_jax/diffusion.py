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
from diffusion_jax.processes.targets import Levels, from_prediction, mean_channels  # noqa: F401 (re-exported)
from diffusion_jax.schedules import Schedule, gather

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


# ---------------------------------------------------------------------------- conversions
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


def predict_x0_eps(s: Schedule, output, x_t, t, prediction: str = "eps", clip_x0: bool = False):
    """(x0, eps) implied by the model's mean output under `prediction` at indices t [B]
    (`processes.targets.from_prediction` at the schedule's levels); with `clip_x0`, x0 is clipped
    to [-1, 1] and eps recomputed from it."""
    _check_option("prediction", prediction, PREDICTIONS)
    t = _prepare(s, x_t, t)
    lv = Levels(extract(s.sqrt_alphas_cumprod, t, x_t.ndim), extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))
    return from_prediction(prediction, lv, x_t, output, clip_x0)


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
