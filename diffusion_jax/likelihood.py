"""Likelihood of the data under the model: the variational bound in bits per dimension.

All terms are returned per example ([B]) in bits per dimension (mean over the non-batch axes
divided by log 2), so the terms add up to the bound on -log2 p(x0) / D (DDPM eq. 5):

    L = L_T (prior) + sum_{t>0} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) + L_0 (decoder NLL)

The decoder is DDPM's discretised Gaussian for 8-bit data in [-1, 1] (bins of width 2/255, the
edge bins open to -inf and +inf).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from diffusion_jax import draws
from diffusion_jax.errors import UsageError
from diffusion_jax.diffusion import (_prepare, mean_flat, p_mean_variance, q_mean_variance,
                                     q_posterior, q_sample)
from diffusion_jax.schedules import Schedule

LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) elementwise (nats) of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2)
    integrated over the pixel's bin [x - 1/255, x + 1/255]; the edge bins extend to infinity."""
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise UsageError(f"x {x.shape}, means {means.shape} and log_scales {log_scales.shape} "
                         "must have the same shape")
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = log_ndtr(plus_in)
    log_one_minus_cdf_min = log_ndtr(-min_in)
    # Difference of CDFs, taken on the side of the mean where it does not cancel.
    cdf_delta = jnp.where(min_in > 0, ndtr(-min_in) - ndtr(-plus_in), ndtr(plus_in) - ndtr(min_in))
    log_mid = jnp.log(jnp.maximum(cdf_delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def discrete_schedule(process):
    """The `Schedule` of a process with a discrete posterior (DDPM's; a Schedule itself), whose
    variational bound this module computes; None for a process without one."""
    return process if isinstance(process, Schedule) else getattr(process, "schedule", None)


def prior_bpd(s: Schedule, x0):
    """KL(q(x_{T-1} | x0) || N(0, I)) in bits/dim, [B]: the L_T term (no parameters)."""
    t_last = jnp.full((x0.shape[0],), s.num_timesteps - 1, jnp.int32)
    mean, _, log_var = q_mean_variance(s, x0, t_last)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LOG2


def vlb_terms_bpd(s: Schedule, model_output, x0, x_t, t, *, prediction: str = "eps",
                  variance: str = "fixed_small", clip_x0: bool = False):
    """(L_t in bits/dim [B], the `MeanVariance` of p(x_{t-1} | x_t) it was computed from).

    L_t is KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, and the decoder NLL
    -log p(x0 | x_1) for t == 0 (index 0 here is DDPM's t = 1).
    """
    t = _prepare(s, x_t, t)
    true_mean, _, true_log_var = q_posterior(s, x0, x_t, t)
    out = p_mean_variance(s, model_output, x_t, t, prediction=prediction, variance=variance,
                          clip_x0=clip_x0)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / LOG2
    decoder = -mean_flat(discretized_gaussian_log_likelihood(
        x0, out.mean, 0.5 * out.log_variance)) / LOG2
    return jnp.where(t == 0, decoder, kl), out


def nll_bpd(denoise_fn: Callable, s: Schedule, x0, key, *, prediction: str = "eps",
            variance: str = "fixed_small", clip_x0: bool = True):
    """The full variational bound on -log2 p(x0) / D for x0 [B, ...] (8-bit data in [-1, 1]).

    Runs all T terms in one `lax.scan`, drawing fresh noise for each t. Returns a dict of
    per-example arrays: "total_bpd" [B], "prior_bpd" [B], "vb_bpd" [B, T] (index t: L_t, the
    decoder at t = 0), "kl_bpd" [B] (sum of the t > 0 terms), "decoder_bpd" [B],
    "x0_mse" and "eps_mse" [B, T] (the model's prediction errors at each t).
    """
    s = discrete_schedule(s)
    x0 = x0.astype(jnp.float32)
    B = x0.shape[0]
    T = s.num_timesteps

    def term(_, inputs):
        t_index, step_key = inputs
        t = jnp.full((B,), t_index, jnp.int32)
        noise = draws.normal(step_key, x0.shape)
        x_t = q_sample(s, x0, t, noise)
        out = denoise_fn(x_t, s.timesteps[t]).astype(jnp.float32)
        vb, pred = vlb_terms_bpd(s, out, x0, x_t, t, prediction=prediction, variance=variance,
                                 clip_x0=clip_x0)
        eps = (x_t - jnp.take(s.sqrt_alphas_cumprod, t_index) * pred.pred_x0) / jnp.take(
            s.sqrt_one_minus_alphas_cumprod, t_index)
        return None, (vb, mean_flat((pred.pred_x0 - x0) ** 2), mean_flat((eps - noise) ** 2))

    keys = jax.random.split(key, T)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(term, None, (jnp.arange(T), keys))
    vb, x0_mse, eps_mse = vb.T, x0_mse.T, eps_mse.T  # [B, T]
    prior = prior_bpd(s, x0)
    return {
        "total_bpd": vb.sum(axis=1) + prior,
        "prior_bpd": prior,
        "vb_bpd": vb,
        "kl_bpd": vb[:, 1:].sum(axis=1),
        "decoder_bpd": vb[:, 0],
        "x0_mse": x0_mse,
        "eps_mse": eps_mse,
    }
