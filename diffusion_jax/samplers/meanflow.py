"""MeanFlow's sampler (Geng et al. 2025): a two-time model of the average velocity u(x_t, r, t)
(`objectives.meanflow`) jumps x_r = x_t - (t - r) u(x_t, r, t) from each time of the grid to the
next, on the "uniform" grid by default (1 -> 0 in one step, 1 -> 0.5 -> 0 in two, where a continuous
process's own grid would give 1 -> 0.001 -> 0); one step is the
one-step generator. The model's output is the average velocity in the process's own time (a run of
prediction "velocity"); it sees r in its model-time units (r=). x0 of a step is the jump to t = 0
with the same u.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.targets import mean_channels
from diffusion_jax.samplers.registry import Sampler, register


def meanflow_step(ctx, x, state, lv, key):
    if ctx.process.max_steps is not None:
        raise UsageError(f"sampler 'meanflow' jumps between continuous times: the {ctx.process.name!r} process has "
                         "integer timesteps; use a continuous process (flow)")
    if ctx.prediction != "velocity":
        raise UsageError(f"sampler 'meanflow' jumps with a model of the average velocity: this model predicts "
                         f"{ctx.prediction!r} (train it with objective 'meanflow', prediction 'velocity')")
    r = jnp.where(jnp.isnan(lv.t_next), 0.0, lv.t_next)  # the clean end is time 0
    batch = (x.shape[0],)
    out = ctx.model(x, jnp.full(batch, lv.model_t, jnp.float32),
                    r=jnp.full(batch, ctx.process.model_time(r), jnp.float32))
    u = mean_channels(out, x).astype(jnp.float32)
    return x - (lv.t - r) * u, state, x - lv.t * u


register(Sampler("meanflow", meanflow_step, 1, {}, {"sigmas": "uniform"}))
