"""Consistency models' multistep sampling (Song et al. 2023, Algorithm 1): at each time of the grid
the model's x0 (its consistency function's value, `objectives.consistency`) is taken, then noised
afresh to the next time, x' = alpha' x0 + sigma' z (no noise onto the clean end), so one step is the
one-step generator and more steps refine it. On the "uniform" grid of a continuous process by default
(a flow run: 1 -> 0.5 -> 0 in two steps), DDPM's own grid. `lcm` is the same with LCM's boundary
scalings of the model's x0.
"""
from __future__ import annotations

from diffusion_jax.samplers.methods import denoise_at
from diffusion_jax.samplers.registry import Sampler, register


def consistency_step(ctx, x, state, lv, key):
    x0, _ = denoise_at(ctx, x, lv)
    return lv.alpha_next * x0 + lv.sigma_next * ctx.normal(key), state, x0


register(Sampler("consistency", consistency_step, 1, {}, {"sigmas": "uniform"}))
