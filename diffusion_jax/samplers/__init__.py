"""Samplers: the registry of methods (`sampler_names()`), the driver `sample` that runs any of
them on any process, the grids they walk, and DDIM inversion (`encode`/`decode`).

Importing this package registers the samplers of `methods.py`, `unipc.py`, `lcm.py`, `meanflow.py` and
`consistency.py`.
"""
from diffusion_jax.samplers import methods, unipc, lcm, meanflow, consistency  # register the samplers (in this order)
from diffusion_jax.samplers.driver import (Edit, check_options, decode, default_steps, encode, guided_denoise_fn, model_calls,
                                           sample, sampler_options, sampling_grid)
from diffusion_jax.samplers.grids import Grid, make_grid
from diffusion_jax.samplers.registry import Sampler, get_sampler, register, sampler_names
