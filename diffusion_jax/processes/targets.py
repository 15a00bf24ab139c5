"""What a model's output means, for any process, in one place: `prediction_target` gives the
target of a prediction from (x0, eps), `from_prediction` turns an output back into (x0, eps).

  eps       the noise;
  x0        the data;
  v         alpha eps - sigma x0 (Salimans & Ho 2022; for alpha^2 + sigma^2 != 1 the same
            combination, inverted with the 2x2 system below);
  velocity  d x_t / dt = alpha'(t) x0 + sigma'(t) eps along the path (eps - x0 for "flow"); the
            derivatives come from the process's `marginal` by `jax.jvp`, so a continuous time.

Shapes: t [B] (or a scalar), x0, eps, x_t and outputs [B, ...]; coefficients broadcast over the
non-batch axes. Arithmetic in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError

PREDICTIONS = ("eps", "x0", "v", "velocity")


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UsageError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def _broadcast(c, x):
    c = jnp.asarray(c, jnp.float32)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def coefficients(process, t, x, derivatives: bool = False):
    """(alpha, sigma) at t, broadcast against x [B, ...]; with `derivatives` also (alpha', sigma')."""
    if not derivatives:
        alpha, sigma = process.marginal(t)
        return _broadcast(alpha, x), _broadcast(sigma, x)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise UsageError(f"the velocity target needs a continuous-time process, not {process.name!r} "
                         "(integer time): use prediction 'eps', 'x0' or 'v'")
    (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(process.marginal, (t,), (jnp.ones_like(t),))
    return tuple(_broadcast(c, x) for c in (alpha, sigma, d_alpha, d_sigma))


def prediction_target(prediction: str, process, t, x0, eps):
    """The model's target for `prediction` at times t given the data x0 and the noise eps."""
    _check(prediction)
    x0, eps = jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        alpha, sigma = coefficients(process, t, x0)
        return alpha * eps - sigma * x0
    _, _, d_alpha, d_sigma = coefficients(process, t, x0, derivatives=True)
    return d_alpha * x0 + d_sigma * eps


def from_prediction(prediction: str, process, t, x_t, out):
    """(x0, eps) [B, ...] implied by the model output `out` for `prediction` at x_t, times t.

    With x_t = alpha x0 + sigma eps and out = p x0 + q eps (v: p = -sigma, q = alpha; velocity:
    p = alpha', q = sigma'), x0 = (q x_t - sigma out) / (alpha q - sigma p) and
    eps = (alpha out - p x_t) / (alpha q - sigma p).
    """
    _check(prediction)
    x_t, out = jnp.asarray(x_t, jnp.float32), jnp.asarray(out, jnp.float32)
    if prediction in ("eps", "x0"):
        alpha, sigma = coefficients(process, t, x_t)
        if prediction == "eps":
            return (x_t - sigma * out) / alpha, out
        return out, (x_t - alpha * out) / sigma
    if prediction == "v":
        alpha, sigma = coefficients(process, t, x_t)
        p, q = -sigma, alpha
    else:
        alpha, sigma, p, q = coefficients(process, t, x_t, derivatives=True)
    determinant = alpha * q - sigma * p
    return (q * x_t - sigma * out) / determinant, (alpha * out - p * x_t) / determinant


def ode_velocity(prediction: str, process, t, x_t, out, clip_x0: bool = False):
    """(dx/dt [B, ...], x0 [B, ...]) of a model output: the velocity alpha'(t) x0 + sigma'(t) eps of
    the probability-flow ODE through x_t, from the (x0, eps) the output implies; with `clip_x0`,
    x0 clipped to [-1, 1] and eps made consistent with it."""
    x0, eps = from_prediction(prediction, process, t, x_t, out)
    alpha, sigma, d_alpha, d_sigma = coefficients(process, t, x_t, derivatives=True)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (jnp.asarray(x_t, jnp.float32) - alpha * x0) / sigma
    return d_alpha * x0 + d_sigma * eps, x0
