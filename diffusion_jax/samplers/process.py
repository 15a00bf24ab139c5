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
    straight paths of "edm" and "flow").

A step is `step(ctx, x, t, t_next, noise) -> (x', x0)` with its noise given, so a chain can be
checked step by step against another implementation; `sample_process` runs K of them in one
`lax.scan`. (The discrete samplers, ddpm and dpm_solver++, stay DDPM's.)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes import from_prediction
from diffusion_jax.processes.targets import coefficients, ode_velocity
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


def euler_step(ctx, x, t, t_next, noise):
    d, x0 = slope(ctx, x, t)
    return x + (t_next - t) * d, x0


def heun_step(ctx, x, t, t_next, noise):
    """EDM Algorithm 2: churn (on "edm", inside [s_tmin, s_tmax]) raises t to t_hat = t (1 + gamma),
    gamma = min(s_churn / K, sqrt(2) - 1), with noise of variance t_hat^2 - t^2 (times s_noise^2);
    then Euler to t_next and, unless t_next is the clean end, the trapezoid correction."""
    o = ctx.options
    if ctx.process.name == "edm":
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
    return jax.lax.cond(last, lambda x_e: x_e, corrected, x_euler), x0


def ddim_step(ctx, x, t, t_next, noise):
    tb = _full(x, t)
    out = ctx.model(x, ctx.process.model_time(tb))
    x0, eps = from_prediction(ctx.prediction, ctx.process, tb, x, out)
    if ctx.clip_x0:
        alpha, sigma = coefficients(ctx.process, tb, x)
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    alpha_next, sigma_next = coefficients(ctx.process, _full(x, t_next), x)
    return alpha_next * x0 + sigma_next * eps, x0


class ProcessMethod(NamedTuple):
    step: Callable
    default_steps: int
    options: dict  # {name: registry.Option}, traced


# Heun's churn options are the sigma samplers' (samplers/sigma.py), declared once with their ranges.
METHODS = {"euler": ProcessMethod(euler_step, 50, {}),
           "heun": ProcessMethod(heun_step, 18, CHURN_OPTIONS),
           "ddim": ProcessMethod(ddim_step, 50, {})}


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
    if not isinstance(churn, jax.core.Tracer) and churn and process.name != "edm":
        raise UsageError(f"s_churn raises sigma as EDM does: it needs process 'edm', not {process.name!r}")
    return merged


def sample_process(model: Callable, process, shape, key, *, method: str = "euler", num_steps=None,
                   prediction: str = "eps", clip_x0: bool = False, x_T=None, keys=None, options=None,
                   trajectory_every=None):
    """x at the clean end [B, ...] after `num_steps` steps of `method` from x_T (default
    prior_std * N(0, I) from `key`). `model(x, model_time [B])` is the (guided) model; `keys` says
    how noise is drawn from `key` (the driver's `KeyOps`: one key, or one per sample; default one
    key, unsharded). One `lax.scan`; the grid is static."""
    m = process_method(method, process)
    num_steps = m.default_steps if num_steps is None else num_steps
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise UsageError(f"num_steps must be a positive integer, got {num_steps!r}")
    opts = check_process_options(method, process, dict(options or {}))
    first = np.float32(process.default_grid(int(num_steps))[0])
    with jax.ensure_compile_time_eval():  # a host value even when traced under jit
        alpha_first = float(np.asarray(process.marginal(first)[0]))
    if prediction == "eps" and alpha_first == 0.0:
        raise UsageError(f"an eps-prediction model cannot start a {process.name!r} chain at t = {first:g}, where "
                         "alpha = 0 (x0 cannot be told from the noise there): train it to predict velocity, v or x0")
    split, fold_in, normal = keys or (lambda k: tuple(jax.random.split(k)), jax.random.fold_in,
                                      lambda k: jax.random.normal(k, tuple(shape), jnp.float32))
    grid = np.asarray(process.default_grid(int(num_steps)), np.float32)
    ctx = ProcessContext(model, process, prediction, clip_x0, int(num_steps),
                         {k: jnp.asarray(v, jnp.float32) for k, v in opts.items()})
    key_init, key_steps = split(key)
    x = (jnp.asarray(x_T, jnp.float32).reshape(tuple(shape)) if x_T is not None
         else process.prior_std * normal(key_init))

    def body(x, inputs):
        t, t_next, i = inputs
        x_next, x0 = m.step(ctx, x, t, t_next, normal(fold_in(key_steps, i)))
        return x_next, (x, x0)

    inputs = (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:]), jnp.arange(len(grid) - 1))
    if trajectory_every is None:
        x, _ = jax.lax.scan(lambda x, inp: (body(x, inp)[0], None), x, inputs)
        return x
    every = int(trajectory_every)
    saved = -(-int(num_steps) // every)
    buffers = (jnp.zeros((saved + 1,) + x.shape, jnp.float32),) * 2

    def body_traj(carry, inp):
        x, (buf_x, buf_x0) = carry
        x_next, (x_before, x0) = body(x, inp)
        write, slot = inp[2] % every == 0, inp[2] // every
        buf_x = buf_x.at[slot].set(jnp.where(write, x_before, buf_x[slot]))
        buf_x0 = buf_x0.at[slot].set(jnp.where(write, x0, buf_x0[slot]))
        return (x_next, (buf_x, buf_x0)), None

    (x, (buf_x, buf_x0)), _ = jax.lax.scan(body_traj, (x, buffers), inputs)
    with jax.ensure_compile_time_eval():  # host values even under jit
        times = np.append(np.asarray(process.model_time(grid[:-1][::every])),
                          np.asarray(process.model_time(np.float32(grid[-1]))))
    return x, {"x_t": buf_x.at[saved].set(x), "pred_x0": buf_x0.at[saved].set(x), "t": jnp.asarray(times)}
