"""The samplers, each one step in the (alpha, sigma) form that serves every process. A step goes
from level (alpha, sigma) to (alpha', sigma'); the model's output becomes (x0, eps) there
(`denoised`); `var` is the forward kernel's variance between the levels, sigma^2 - (alpha /
alpha')^2 sigma'^2, so the Gaussian posterior q(x' | x, x0) has variance var sigma'^2 / sigma^2.

  * "ddpm": ancestral sampling from that posterior at the model's x0 (Ho et al. 2020), its
    variance "fixed_small" (the posterior's), "fixed_large" (var) or "learned_range" (the
    model's interpolation between their logs, improved DDPM); no noise onto the clean end;
  * "ddim": x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z, s^2 = eta^2 var sigma'^2 / sigma^2
    (Song et al. 2021); "euler_ancestral" is its eta = 1 (k-diffusion's ancestral step);
  * "euler": the probability-flow ODE's Euler step in coordinates where it is linear, which is
    DDIM's eta = 0 step (diffusers' Euler and FlowMatchEuler schedulers), after EDM's churn;
  * "heun": EDM's Algorithm 2: churn, the Euler step, then the trapezoid correction in the
    process's ODE coordinates tau = sigma / (alpha + k sigma), y = x / (alpha + k sigma)
    (k = `process.ode_frame`), except on the step onto the clean end;
  * "dpm++_2m", "dpm++_2m_sde", "dpm_solver++": DPM-Solver++(2M) in lambda = log(alpha / sigma)
    (Lu et al. 2022) with r = exp(-h) = (sigma' alpha) / (sigma alpha'): x' = (sigma' / sigma) x +
    alpha' (1 - r) D, D = x0 at a first-order step and (1 + 1 / (2q)) x0 - x0_prev / (2q) else
    (q = h_prev / h); the SDE form x' = (sigma' / sigma) r x + alpha' (1 - r^2) D + sigma'
    sqrt(1 - r^2) z. "dpm_solver++" is the same on the log-SNR grid, first order also at step K - 2
    for K < 15 (DPM-Solver's lower_order_final).
Written with r and var, every step is finite where alpha = 0 (a noisy end of zero SNR) and where
sigma' = 0 (the clean end).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.ddpm import MIN_ABAR
from diffusion_jax.processes.targets import Levels, from_prediction, mean_channels
from diffusion_jax.samplers.registry import Sampler, flag, name, register, traced

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def model_output(ctx, x, model_t):
    """The (guided) model's output at x [B, ...] and model time `model_t` (a scalar)."""
    return ctx.model(x, jnp.full((x.shape[0],), model_t, jnp.float32))


def denoised(ctx, x, t, alpha, sigma, out):
    """(x0, eps) of a model output at state x, level (t, alpha, sigma) (scalars); a velocity's
    alpha', sigma' are the process's at t."""
    lv = Levels(alpha, sigma)
    if ctx.prediction == "velocity":
        t = jnp.asarray(t, jnp.float32)
        _, (d_alpha, d_sigma) = jax.jvp(ctx.process.marginal, (t,), (jnp.ones_like(t),))
        lv = Levels(alpha, sigma, d_alpha, d_sigma)
    return from_prediction(ctx.prediction, lv, x, mean_channels(out, x), ctx.clip_x0)


def denoise_at(ctx, x, lv):
    return denoised(ctx, x, lv.t, lv.alpha, lv.sigma, model_output(ctx, x, lv.model_t))


def ancestral_step(ctx, x, state, lv, key):
    out = model_output(ctx, x, lv.model_t)
    x0, _ = denoised(ctx, x, lv.t, lv.alpha, lv.sigma, out)
    ratio = (lv.sigma_next / lv.sigma) ** 2
    mean = lv.alpha_next * lv.var / lv.sigma ** 2 * x0 + lv.alpha / lv.alpha_next * ratio * x
    variance = ctx.options["variance"]
    if variance == "fixed_small":
        log_var = jnp.log(lv.var * ratio)
    elif variance == "fixed_large":
        log_var = jnp.log(lv.var)
    else:  # improved DDPM: v in [-1, 1] between log(posterior variance) and log(var)
        frac = (out[..., x.shape[-1]:].astype(jnp.float32) + 1.0) / 2.0
        log_var = frac * jnp.log(lv.var) + (1.0 - frac) * jnp.log(lv.var * ratio)
    noise = jnp.where(lv.sigma_next > 0, jnp.exp(0.5 * log_var), 0.0) * ctx.normal(key)  # none onto the clean end
    return mean + noise, state, x0


def ddim_step(ctx, x, state, lv, key, eta=None):
    x0, eps = denoise_at(ctx, x, lv)
    eta = ctx.options["eta"] if eta is None else eta
    s2 = eta * eta * lv.var * (lv.sigma_next / lv.sigma) ** 2
    x_next = lv.alpha_next * x0 + jnp.sqrt(jnp.maximum(lv.sigma_next ** 2 - s2, 0.0)) * eps
    return x_next + jnp.sqrt(s2) * ctx.normal(key), state, x0


def churn(ctx, x, lv, key):
    """EDM's churn: inside [s_tmin, s_tmax] the level's sigma / alpha s is raised to s (1 + gamma),
    gamma = min(s_churn / K, sqrt(2) - 1), by noise (times s_noise); elsewhere x and its level are
    returned unchanged (bitwise: no noise is added at s_churn = 0)."""
    o = ctx.options
    s = lv.sigma / lv.alpha
    inside = (o["s_tmin"] <= s) & (s <= o["s_tmax"]) & jnp.isfinite(s)
    gamma = jnp.where(inside, jnp.minimum(o["s_churn"] / ctx.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    t_hat = ctx.process.time_at(s * (1.0 + gamma))
    alpha_hat, sigma_hat = ctx.process.marginal(t_hat)
    raised = jnp.sqrt(jnp.maximum((sigma_hat / alpha_hat) ** 2 - s * s, 0.0))
    x_hat = alpha_hat / lv.alpha * x + alpha_hat * raised * o["s_noise"] * ctx.normal(key)
    on = gamma > 0
    return jnp.where(on, x_hat, x), lv._replace(
        t=jnp.where(on, t_hat, lv.t), alpha=jnp.where(on, alpha_hat, lv.alpha),
        sigma=jnp.where(on, sigma_hat, lv.sigma), model_t=jnp.where(on, ctx.process.model_time(t_hat), lv.model_t))


def euler_step(ctx, x, state, lv, key):
    x, lv = churn(ctx, x, lv, key)
    x0, eps = denoise_at(ctx, x, lv)
    return lv.alpha_next * x0 + lv.sigma_next * eps, state, x0


def _frame(ctx, alpha, sigma):
    """(tau, 1 / scale) of a level in the process's ODE coordinates (an infinite tau held at 2^12)."""
    scale = jnp.maximum(alpha + ctx.process.ode_frame * sigma, sigma * math.sqrt(MIN_ABAR))
    return sigma / scale, scale


def heun_step(ctx, x, state, lv, key):
    x, lv = churn(ctx, x, lv, key)
    x0, eps = denoise_at(ctx, x, lv)
    x_euler = lv.alpha_next * x0 + lv.sigma_next * eps

    def corrected(x_euler):
        x0_next, eps_next = denoised(ctx, x_euler, lv.t_next, lv.alpha_next, lv.sigma_next,
                                     model_output(ctx, x_euler, lv.model_t_next))
        (tau, _), (tau_next, scale_next) = _frame(ctx, lv.alpha, lv.sigma), _frame(ctx, lv.alpha_next, lv.sigma_next)
        slope_change = ctx.process.ode_frame * (x0 - x0_next) + (eps_next - eps)
        return x_euler + 0.5 * (tau_next - tau) * scale_next * slope_change

    return jax.lax.cond(lv.sigma_next > 0, corrected, lambda x_e: x_e, x_euler), state, x0


def dpm_init(x):
    return {"x0": jnp.zeros(x.shape, jnp.float32), "h": jnp.ones((), jnp.float32)}


def dpm_step(ctx, x, state, lv, key, sde: bool = False):
    x0, _ = denoise_at(ctx, x, lv)
    r = (lv.sigma_next * lv.alpha) / (lv.sigma * lv.alpha_next)
    h = (jnp.log(lv.alpha_next) - jnp.log(lv.sigma_next)) - (jnp.log(lv.alpha) - jnp.log(lv.sigma))
    final = ctx.options["lower_order_final"] & (ctx.num_steps < 15) & (lv.i == ctx.num_steps - 2)
    first = (lv.i == 0) | (lv.sigma_next == 0) | final
    half_over_q = 0.5 * h / state["h"]
    d = jnp.where(first, x0, (1.0 + half_over_q) * x0 - half_over_q * state["x0"])
    if not sde:
        x_next = lv.sigma_next / lv.sigma * x + lv.alpha_next * (1.0 - r) * d
    else:
        x_next = (lv.sigma_next / lv.sigma * r * x + lv.alpha_next * (1.0 - r * r) * d
                  + lv.sigma_next * jnp.sqrt(1.0 - r * r) * ctx.normal(key))
    return x_next, {"x0": x0, "h": h}, x0


CHURN = {"s_churn": traced(0.0, minimum=0.0), "s_tmin": traced(0.0, minimum=0.0),
         "s_tmax": traced(float("inf"), minimum=0.0, infinite=True), "s_noise": traced(1.0, minimum=0.0)}


def check_churn_window(method: str, options: dict) -> None:
    low, high = options["s_tmin"], options["s_tmax"]
    if not any(isinstance(v, jax.core.Tracer) for v in (low, high)) and low > high:
        raise UsageError(f"sampler {method!r}: the churn window [s_tmin, s_tmax] = [{low:g}, {high:g}] is empty: give "
                         "s_tmin <= s_tmax")


DPM = {"lower_order_final": flag(False)}

register(Sampler("ddpm", ancestral_step, None, {"variance": name("fixed_small", VARIANCES)}))
register(Sampler("ddim", ddim_step, 50, {"eta": traced(0.0, minimum=0.0, maximum=1.0)}))
register(Sampler("dpm_solver++", dpm_step, 20, {"lower_order_final": flag(True)}, {"sigmas": "logsnr"},
                 init_state=dpm_init))
register(Sampler("euler", euler_step, 50, CHURN, {"sigmas": "karras"}, check_options=check_churn_window))
register(Sampler("heun", heun_step, 18, CHURN, {"sigmas": "karras"}, model_calls=lambda k: 2 * k - 1,
                 check_options=check_churn_window))
register(Sampler("euler_ancestral", functools.partial(ddim_step, eta=1.0), 50, {}, {"sigmas": "karras"}))
register(Sampler("dpm++_2m", dpm_step, 20, DPM, {"sigmas": "karras"}, init_state=dpm_init))
register(Sampler("dpm++_2m_sde", functools.partial(dpm_step, sde=True), 20, DPM, {"sigmas": "karras"},
                 init_state=dpm_init))
