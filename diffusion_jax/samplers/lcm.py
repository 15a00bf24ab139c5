"""LCM (Luo et al. 2023): multistep sampling of a Latent Consistency Model (or an SD model with an
LCM-LoRA) as diffusers' `LCMScheduler` runs it, on the "lcm" grid (`grids.lcm_times`).

At level (alpha, sigma) with model time t the model's x0 becomes the consistency function's output
D = c_out x0 + c_skip x, with the boundary scalings of a discrete time s = t x timestep_scaling:
c_skip = sigma_d^2 / (s^2 + sigma_d^2), c_out = s / sqrt(s^2 + sigma_d^2), sigma_d = 0.5; the next
level is reached by noising D afresh, x' = alpha' D + sigma' z (no noise onto the clean end, so one
step is the one-step generator).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers.methods import denoise_at
from diffusion_jax.samplers.registry import Sampler, register, traced

SIGMA_DATA = 0.5


def lcm_step(ctx, x, state, lv, key):
    x0, _ = denoise_at(ctx, x, lv)
    s = lv.model_t * ctx.options["timestep_scaling"]
    c_skip = SIGMA_DATA ** 2 / (s * s + SIGMA_DATA ** 2)
    c_out = s / jnp.sqrt(s * s + SIGMA_DATA ** 2)
    denoised = c_out * x0 + c_skip * x
    return lv.alpha_next * denoised + lv.sigma_next * ctx.normal(key), state, denoised


register(Sampler("lcm", lcm_step, 4, {"timestep_scaling": traced(10.0, minimum=0.0)}, {"sigmas": "lcm"}))
