"""Samplers on a continuous-time process ("vp", "edm", "flow"): the chain walks the process's
own grid (`process.default_grid`: diffusers' FlowMatchEulerDiscreteScheduler sigmas for "flow",
EDM's rho steps for "edm") in the process's own state x_t = alpha(t) x0 + sigma(t) eps, starting
from x_T ~ N(0, prior_std^2). Each model output becomes (x0, eps) through `processes.targets`, so
an eps-, x0-, v- or velocity-prediction model runs every method.

  * "euler": x' = x + (t' - t) dx/dt, dx/dt = alpha'(t) x0 + sigma'(t) eps (the probability-flow
    ODE in the process's time: diffusers' FlowMatchEulerDiscreteScheduler on "flow");
  * "heun": EDM's Algorithm 2 in the process's time: the Euler step corrected by the slope at its
    end, the last step (to the clean end) left an Euler step; on "edm" with S_churn / S_min /
    S_max / S_noise (NVlabs/edm's `edm_sampler`);
  * "ddim": x' = alpha(t') x0 + sigma(t') eps (deterministic DDIM; the same as Euler on the
    straight paths of "edm" and "flow");
  * "euler_ancestral": the ancestral step (DDIM with eta = 1): x' = alpha' x0 + sigma' r eps
    + sigma' sqrt(1 - r^2) z, where r = exp(-h) = (sigma' / alpha') / (sigma / alpha) and
    h = lambda' - lambda, lambda = log(alpha / sigma) (k-diffusion's step on "edm");
  * "dpm++_2m": DPM-Solver++(2M) in lambda: x' = (sigma' / sigma) x + alpha' (1 - r) D, with
    D = x0 at the first and the last step and (1 + 1/(2 q)) x0 - 1/(2 q) x0_prev in between
    (q = h_prev / h);
  * "dpm++_2m_sde": its SDE variant, x' = (sigma' / sigma) r x + alpha' (1 - r^2) D
    + sigma' sqrt(1 - r^2) z.
Written with r rather than h, every step is finite where alpha = 0 (the noisy end of "flow":
lambda = -inf, r = 0) and where sigma' = 0 (the clean end: x' = alpha' D).

A step is `step(ctx, x, state, inputs, noise) -> (x', state', x0)`, `inputs` = {"t", "t_next",
"i"}, with its noise given, so a chain can be checked step by step against another
implementation; `sample_process` runs K of them in one `lax.scan`, wrapped (as the driver wraps
the discrete samplers) by inpainting, RePaint and SDEdit. (The discrete samplers, ddpm and
dpm_solver++, stay DDPM's.)
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes import from_prediction
from diffusion_jax.processes.targets import coefficients, ode_velocity
from diffusion_jax.samplers.chain import scan_chain
from diffusion_jax.samplers.sigma import CHURN_OPTIONS


class ProcessContext(NamedTuple):
    """What every step of one chain shares: the (guided) model `model(x, model_time [B])`, the
    process, what the model predicts, clipping of x0, the step count and the traced options."""

    model: Callable
    process: object
    prediction: str
    clip_x0: bool
    num_steps: int
    options: dict


def _full(x, t):
    return jnp.full((x.shape[0],), t, jnp.float32)


def slope(ctx: ProcessContext, x, t):
    """(dx/dt = alpha'(t) x0 + sigma'(t) eps, x0) of the model at state x [B, ...], time t (scalar)."""
    tb = _full(x, t)
    return ode_velocity(ctx.prediction, ctx.process, tb, x, ctx.model(x, ctx.process.model_time(tb)), ctx.clip_x0)


def denoised(ctx: ProcessContext, x, t):
    """(x0, eps) [B, ...] the model implies at state x, time t (scalar); with `clip_x0`, x0
    clipped to [-1, 1] and eps made consistent with it."""
    tb = _full(x, t)
    x0, eps = from_prediction(ctx.prediction, ctx.process, tb, x, ctx.model(x, ctx.process.model_time(tb)))
    if ctx.clip_x0:
        alpha, sigma = coefficients(ctx.process, tb, x)
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return x0, eps


def euler_step(ctx, x, state, inputs, noise):
    t, t_next = inputs["t"], inputs["t_next"]
    d, x0 = slope(ctx, x, t)
    return x + (t_next - t) * d, state, x0


def heun_step(ctx, x, state, inputs, noise):
    """EDM Algorithm 2: churn (on "edm", inside [s_tmin, s_tmax]) raises t to t_hat = t (1 + gamma),
    gamma = min(s_churn / K, sqrt(2) - 1), with noise of variance t_hat^2 - t^2 (times s_noise^2);
    then Euler to t_next and, unless t_next is the clean end, the trapezoid correction."""
    t, t_next, o = inputs["t"], inputs["t_next"], ctx.options
    if ctx.process.time_is_sigma:  # EDM's churn raises sigma, which is t here
        inside = (o["s_tmin"] <= t) & (t <= o["s_tmax"])
        gamma = jnp.where(inside, jnp.minimum(o["s_churn"] / ctx.num_steps, math.sqrt(2.0) - 1.0), 0.0)
        t_hat = t + gamma * t
        # sqrt(t_hat^2 - t^2) written as t sqrt(gamma (2 + gamma)): exactly 0 without churn (the
        # difference of squares is not, where XLA fuses it into a multiply-add: sqrt(ulp(t^2)))
        x_hat = x + t * jnp.sqrt(gamma * (2.0 + gamma)) * o["s_noise"] * noise
    else:
        t_hat, x_hat = t, x
    d, x0 = slope(ctx, x_hat, t_hat)
    x_euler = x_hat + (t_next - t_hat) * d

    def corrected(x_euler):
        d_next, _ = slope(ctx, x_euler, t_next)
        return x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)

    last = t_next == ctx.process.t_clean
    return jax.lax.cond(last, lambda x_e: x_e, corrected, x_euler), state, x0


def _levels(ctx, t, t_next):
    """(alpha, sigma, alpha', sigma', r = exp(-h), h) of the step t -> t_next (scalars), with
    r = (sigma' alpha) / (sigma alpha'): 0, not NaN, where alpha or sigma' is 0 (h = +inf)."""
    alpha, sigma = ctx.process.marginal(t)
    alpha_next, sigma_next = ctx.process.marginal(t_next)
    h = (jnp.log(alpha_next) - jnp.log(sigma_next)) - (jnp.log(alpha) - jnp.log(sigma))
    return alpha, sigma, alpha_next, sigma_next, (sigma_next * alpha) / (sigma * alpha_next), h


def ddim_step(ctx, x, state, inputs, noise):
    x0, eps = denoised(ctx, x, inputs["t"])
    alpha_next, sigma_next = coefficients(ctx.process, _full(x, inputs["t_next"]), x)
    return alpha_next * x0 + sigma_next * eps, state, x0


def euler_ancestral_step(ctx, x, state, inputs, noise):
    x0, eps = denoised(ctx, x, inputs["t"])
    _, _, alpha_next, sigma_next, r, _ = _levels(ctx, inputs["t"], inputs["t_next"])
    return alpha_next * x0 + sigma_next * (r * eps + jnp.sqrt(1.0 - r * r) * noise), state, x0


def dpmpp_2m_init(x):
    return {"x0": jnp.zeros(x.shape, jnp.float32), "h": jnp.ones((), jnp.float32)}


def dpmpp_2m_step(ctx, x, state, inputs, noise, sde: bool = False):
    t, t_next = inputs["t"], inputs["t_next"]
    x0, _ = denoised(ctx, x, t)
    alpha, sigma, alpha_next, sigma_next, r, h = _levels(ctx, t, t_next)
    half_over_q = 0.5 * h / state["h"]
    first = (inputs["i"] == 0) | (t_next == ctx.process.t_clean)
    d = jnp.where(first, x0, (1.0 + half_over_q) * x0 - half_over_q * state["x0"])
    if not sde:
        x_next = (sigma_next / sigma) * x + alpha_next * (1.0 - r) * d
    else:
        x_next = ((sigma_next / sigma) * r * x + alpha_next * (1.0 - r * r) * d
                  + sigma_next * jnp.sqrt(1.0 - r * r) * noise)
    return x_next, {"x0": x0, "h": h}, x0


class ProcessMethod(NamedTuple):
    step: Callable
    default_steps: int
    options: dict  # {name: registry.Option}, traced
    init_state: Callable = lambda x: ()
    model_calls: Callable = lambda k: k  # model evaluations of K steps


# Heun's churn options are the sigma samplers' (samplers/sigma.py), declared once with their ranges.
METHODS = {"euler": ProcessMethod(euler_step, 50, {}),
           "heun": ProcessMethod(heun_step, 18, CHURN_OPTIONS, model_calls=lambda k: 2 * k - 1),
           "ddim": ProcessMethod(ddim_step, 50, {}),
           "euler_ancestral": ProcessMethod(euler_ancestral_step, 50, {}),
           "dpm++_2m": ProcessMethod(dpmpp_2m_step, 20, {}, dpmpp_2m_init),
           "dpm++_2m_sde": ProcessMethod(functools.partial(dpmpp_2m_step, sde=True), 20, {}, dpmpp_2m_init)}


def process_method(method: str, process) -> ProcessMethod:
    if method not in METHODS:
        raise UsageError(f"method {method!r} does not run a {process.name!r} process (it walks DDPM's discrete "
                         f"schedule): choose one of {sorted(METHODS)}")
    return METHODS[method]


def check_process_options(method: str, process, options: dict) -> dict:
    """The method's traced options, each checked by its declaration (`registry.Option`), defaults
    filled in; an unknown one, or churn off "edm", is an error."""
    declared = process_method(method, process).options
    unknown = set(options) - set(declared)
    if unknown:
        raise UsageError(f"method {method!r} on a {process.name!r} process has no option(s) {sorted(unknown)}; "
                         f"it takes {sorted(declared) or 'none'}")
    merged = {**{k: o.default for k, o in declared.items()},
              **{k: declared[k].check(method, k, v) for k, v in options.items()}}
    churn = merged.get("s_churn", 0.0)
    if not isinstance(churn, jax.core.Tracer) and churn and not process.time_is_sigma:
        raise UsageError(f"s_churn raises sigma as EDM does: it needs process 'edm', not {process.name!r}")
    return merged


def _start_index(process, grid, start_step) -> int:
    """SDEdit: the first grid time whose model time is at or below `start_step`."""
    with jax.ensure_compile_time_eval():  # host values even under jit
        model_times = np.asarray(process.model_time(np.asarray(grid[:-1], np.float32)))
    below = np.nonzero(model_times <= start_step)[0]
    if len(below) == 0:
        raise UsageError(f"start_step {start_step!r} is below every step of the {process.name!r} grid (its last "
                         f"model time is {model_times[-1]:g}): give a larger one, in the model's time units")
    return int(below[0])


def sample_process(model: Callable, process, shape, key, *, method: str = "euler", num_steps=None,
                   prediction: str = "eps", clip_x0: bool = False, x_T=None, keys=None, options=None,
                   trajectory_every=None, known=None, mask=None, repaint_resamples: int = 1, start_x=None,
                   start_step=None):
    """x at the clean end [B, ...] after `num_steps` steps of `method` from x_T (default
    prior_std * N(0, I) from `key`). `model(x, model_time [B])` is the (guided) model; `keys` says
    how noise is drawn from `key` (the driver's `KeyOps`: one key, or one per sample; default one
    key, unsharded). One `lax.scan`; the grid is static.

    Inpainting: after every step the pixels with mask = 1 become `known` at the new time,
    alpha(t') known + sigma(t') z; RePaint takes each step `repaint_resamples` times, going back
    between with the forward kernel x_t = (alpha_t / alpha_t') x_t' + sqrt(sigma_t^2 -
    (alpha_t sigma_t' / alpha_t')^2) z. SDEdit: `start_x` at the first grid time whose model
    time (the process's units: 1000 t for "flow", sigma for "edm") is at or below `start_step`.
    """
    m = process_method(method, process)
    num_steps = m.default_steps if num_steps is None else num_steps
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise UsageError(f"num_steps must be a positive integer, got {num_steps!r}")
    opts = check_process_options(method, process, dict(options or {}))
    grid = np.asarray(process.default_grid(int(num_steps)), np.float32)
    if start_step is not None:
        grid = grid[_start_index(process, grid, start_step):]
    with jax.ensure_compile_time_eval():  # a host value even when traced under jit
        alpha_first = float(np.asarray(process.marginal(grid[0])[0]))
    if prediction == "eps" and alpha_first == 0.0:
        raise UsageError(f"an eps-prediction model cannot start a {process.name!r} chain at t = {grid[0]:g}, where "
                         "alpha = 0 (x0 cannot be told from the noise there): train it to predict velocity, v or x0")
    split, fold_in, normal = keys or (lambda k: tuple(jax.random.split(k)), jax.random.fold_in,
                                      lambda k: jax.random.normal(k, tuple(shape), jnp.float32))
    ctx = ProcessContext(model, process, prediction, clip_x0, int(num_steps),
                         {k: jnp.asarray(v, jnp.float32) for k, v in opts.items()})
    key_init, key_steps = split(key)
    alpha_0, sigma_0 = process.marginal(grid[0])
    if x_T is not None:
        x = jnp.asarray(x_T, jnp.float32).reshape(tuple(shape))
    elif start_x is not None:
        x = alpha_0 * jnp.asarray(start_x, jnp.float32) + sigma_0 * normal(key_init)
    else:
        x = process.prior_std * normal(key_init)
    if known is not None:
        known, mask = jnp.asarray(known, jnp.float32), jnp.asarray(mask, jnp.float32)
        if x_T is None and start_x is None:
            x = mask * (alpha_0 * known + sigma_0 * normal(fold_in(key_init, 1))) + (1.0 - mask) * x

    def step(x, state, inputs, k):
        """One step of the method, then the known pixels at the new time (inpainting)."""
        x_next, state, x0 = m.step(ctx, x, state, inputs, normal(k))
        if known is not None:
            alpha_next, sigma_next = process.marginal(inputs["t_next"])
            x_next = mask * (alpha_next * known + sigma_next * normal(fold_in(k, 1))) + (1.0 - mask) * x_next
        return x_next, state, x0

    def repaint_step(x, state, inputs, k):
        (alpha, sigma), (alpha_next, sigma_next) = process.marginal(inputs["t"]), process.marginal(inputs["t_next"])
        ratio = alpha / alpha_next

        def resample(j, x_cur):
            kj = fold_in(k, 2 + j)
            x_next, _, _ = step(x_cur, state, inputs, kj)
            spread = jnp.sqrt(jnp.maximum(sigma * sigma - (ratio * sigma_next) ** 2, 0.0))
            return ratio * x_next + spread * normal(fold_in(kj, 7))

        x = jax.lax.fori_loop(0, repaint_resamples - 1, resample, x)
        return step(x, state, inputs, k)

    take = repaint_step if repaint_resamples > 1 else step

    def body(carry, inputs):
        x, state = carry
        x_next, state, x0 = take(x, state, inputs, fold_in(key_steps, inputs["i"]))
        return (x_next, state), (x, x0)

    inputs = {"t": jnp.asarray(grid[:-1]), "t_next": jnp.asarray(grid[1:]), "i": jnp.arange(len(grid) - 1)}
    x, trajectory = scan_chain(body, (x, m.init_state(x)), inputs, len(grid) - 1, trajectory_every)
    if trajectory is None:
        return x
    with jax.ensure_compile_time_eval():  # host values even under jit
        every = int(trajectory_every)
        times = np.append(np.asarray(process.model_time(grid[:-1][::every])),
                          np.asarray(process.model_time(np.float32(grid[-1]))))
    return x, {**trajectory, "t": jnp.asarray(times)}
