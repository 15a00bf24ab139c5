"""Samplers: the registry of methods (`sampler_names()`), the driver `sample` that runs any of
them in one `lax.scan`, and DDIM inversion (`encode`/`decode`).

Importing this package registers the samplers of `discrete.py` and `sigma.py`.
"""
from diffusion_jax.samplers import discrete, sigma  # register the samplers
from diffusion_jax.samplers.driver import decode, encode, guided_denoise_fn, model_calls, sample, sampling_grid
from diffusion_jax.samplers.registry import Grid, Sampler, get_sampler, register, sampler_names

