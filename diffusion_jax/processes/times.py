"""Training times of a process: "uniform" (the process's own: DDPM's t ~ U{0..T-1}), "logit_normal"
(SD3's), "lognormal" (EDM's noise level sigma / alpha), "mode" (SD3's), each with its options
checked; the denoising loss and the other objectives draw their times here."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.numeric_options import checked_options
from diffusion_jax.processes.registry import T_MARGIN

TIME_SAMPLINGS = ("uniform", "logit_normal", "lognormal", "mode")
# Each option's default and the values that keep the sampling a distribution of times in range.
TIME_SAMPLING_OPTIONS = {"uniform": {}, "logit_normal": {"mean": (0.0, -math.inf, math.inf), "std": (1.0, 0.0, math.inf)},
                         "lognormal": {"p_mean": (-1.2, -math.inf, math.inf), "p_std": (1.2, 0.0, math.inf)},
                         "mode": {"scale": (1.29, -1.0, 1.0 / (math.pi / 2 - 1))}}


def time_sampling_options(time_sampling: str, options) -> dict:
    """The options of a time sampling, defaults filled in, each a finite number in its range (a
    standard deviation above 0; the mode's scale where its map of u stays monotone)."""
    if time_sampling not in TIME_SAMPLINGS:
        raise UsageError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
    return checked_options(f"time_sampling {time_sampling!r}", TIME_SAMPLING_OPTIONS[time_sampling], options,
                           zero_excluded=True)


def sample_times(process, key, batch: int, time_sampling: str = "uniform", **options):
    """Training times [batch] of `process`: uniform its own (DDPM's t ~ U{0..T-1}); logit_normal
    (u = sigmoid(mean + std z), SD3) and mode (SD3's, `scale`) draw u in (0, 1) onto the
    process's times (`training_time`; a flow process's shift moves them); lognormal draws EDM's
    noise level sigma / alpha = exp(p_mean + p_std z) and takes its time."""
    o = time_sampling_options(time_sampling, options)
    if time_sampling == "uniform":
        return process.uniform_times(key, batch)
    if time_sampling == "lognormal":
        return process.time_at(jnp.exp(o["p_mean"] + o["p_std"] * jax.random.normal(key, (batch,), jnp.float32)))
    if time_sampling == "logit_normal":
        u = jax.nn.sigmoid(o["mean"] + o["std"] * jax.random.normal(key, (batch,), jnp.float32))
    else:
        v = jax.random.uniform(key, (batch,), jnp.float32)
        u = 1.0 - v - o["scale"] * (jnp.cos(0.5 * jnp.pi * v) ** 2 - 1.0 + v)
    return process.training_time(jnp.clip(u, T_MARGIN, 1.0 - T_MARGIN))
