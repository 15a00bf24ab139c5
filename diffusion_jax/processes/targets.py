"""What a model's output means, for any process, in one place: `prediction_target` gives the
target of a prediction from (x0, eps), `from_prediction` turns an output back into (x0, eps).

  eps       the noise;
  x0        the data;
  v         alpha eps - sigma x0 (Salimans & Ho 2022; for alpha^2 + sigma^2 != 1 the same
            combination, inverted with the 2x2 system below);
  velocity  d x_t / dt = alpha'(t) x0 + sigma'(t) eps along the path (eps - x0 for "flow"); the
            derivatives come from the process's `marginal` by `jax.jvp`, so a continuous time.

Both take `Levels`: (alpha, sigma[, alpha', sigma']) broadcast against the data, made by
`levels(process, t, x)` or given by a sampler's grid. Shapes: t [B] (or a scalar), x0, eps, x_t
and outputs [B, ...]. Arithmetic in float32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError

PREDICTIONS = ("eps", "x0", "v", "velocity")


class Levels(NamedTuple):
    """alpha, sigma (and, for the velocity, their time derivatives) of x_t = alpha x0 + sigma eps."""

    alpha: jax.Array
    sigma: jax.Array
    d_alpha: Optional[jax.Array] = None
    d_sigma: Optional[jax.Array] = None


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UsageError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def _broadcast(c, x):
    c = jnp.asarray(c, jnp.float32)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def levels(process, t, x, derivatives: bool = False) -> Levels:
    """The process's `Levels` at times t, broadcast against x [B, ...]; the derivatives with
    `derivatives` (a continuous time: a process of integer time has none)."""
    t = jnp.asarray(t)
    if not derivatives:
        return Levels(*(_broadcast(c, x) for c in process.marginal(t)))
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise UsageError(f"the velocity target needs a continuous time: the {process.name!r} process's times here are "
                         "integers; use prediction 'eps', 'x0' or 'v'")
    (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(process.marginal, (t,), (jnp.ones_like(t),))
    return Levels(*(_broadcast(c, x) for c in (alpha, sigma, d_alpha, d_sigma)))


def _mix(prediction: str, lv: Levels):
    """(p, q) with output = p x0 + q eps."""
    return {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-lv.sigma, lv.alpha), "velocity": (lv.d_alpha, lv.d_sigma)}[
        prediction]


def prediction_target(prediction: str, lv: Levels, x0, eps):
    """The model's target for `prediction` given the data x0 and the noise eps."""
    check_prediction(prediction)
    p, q = _mix(prediction, lv)
    return p * jnp.asarray(x0, jnp.float32) + q * jnp.asarray(eps, jnp.float32)


def from_prediction(prediction: str, lv: Levels, x_t, out, clip_x0: bool = False):
    """(x0, eps) [B, ...] implied by the model output `out` for `prediction` at x_t.

    With x_t = alpha x0 + sigma eps and out = p x0 + q eps, x0 = (q x_t - sigma out) / (alpha q -
    sigma p) and eps = (alpha out - p x_t) / (alpha q - sigma p). With `clip_x0`, x0 is clipped
    to [-1, 1] and eps made consistent with it (improved-diffusion's DDIM).
    """
    check_prediction(prediction)
    x_t, out = jnp.asarray(x_t, jnp.float32), jnp.asarray(out, jnp.float32)
    if prediction == "eps":
        x0, eps = (x_t - lv.sigma * out) / lv.alpha, out
    elif prediction == "x0":
        x0, eps = out, (x_t - lv.alpha * out) / lv.sigma
    else:
        p, q = _mix(prediction, lv)
        determinant = lv.alpha * q - lv.sigma * p
        x0, eps = (q * x_t - lv.sigma * out) / determinant, (lv.alpha * out - p * x_t) / determinant
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x_t - lv.alpha * x0) / lv.sigma
    return x0, eps


def ode_velocity(prediction: str, process, t, x_t, out):
    """dx/dt [B, ...] of the probability-flow ODE through x_t at times t [B]: alpha'(t) x0 +
    sigma'(t) eps of the (x0, eps) the model output implies."""
    lv = levels(process, t, x_t, derivatives=True)
    x0, eps = from_prediction(prediction, lv, x_t, out)
    return lv.d_alpha * x0 + lv.d_sigma * eps


def mean_channels(model_output, x_t):
    """The mean part of a model output [B, ..., C] or [B, ..., 2C]: all of it when it has x_t's
    shape, the first C channels of a learned-variance output (improved DDPM's layout)."""
    if model_output.shape == x_t.shape:
        return model_output
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * x_t.shape[-1]:
        raise UsageError(f"the model's output has shape {model_output.shape}: it must be x_t's {x_t.shape}, or have "
                         "twice its channels (a learned variance)")
    return model_output[..., :x_t.shape[-1]]
