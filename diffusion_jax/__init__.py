"""diffusion_jax: denoising diffusion models in JAX/Flax as pure functions.

The core (schedules, diffusion, likelihood, samplers, models) imports with jax/flax/optax alone;
TensorFlow and tfds are imported lazily by the data code only.
"""
from diffusion_jax.schedules import (Schedule, evenly_spaced_timesteps, make_schedule, respace,
                                     schedule_from_betas)
from diffusion_jax.diffusion import (MeanVariance, mean_channels, p_mean_variance, p_sample_step,
                                     predict_x0_eps, q_mean_variance, q_posterior, q_sample)
from diffusion_jax.likelihood import (discretized_gaussian_log_likelihood, nll_bpd, normal_kl,
                                      prior_bpd, vlb_terms_bpd)
from diffusion_jax.losses import loss_weight, training_loss
from diffusion_jax.processes import as_process, make_process, process_names
from diffusion_jax.compilation_cache import enable_compilation_cache

__version__ = "0.1.0"
from diffusion_jax.samplers import Edit, decode, encode, guided_denoise_fn, sample, sampling_grid
