"""diffusion_jax: denoising diffusion models in JAX/Flax as pure functions.

The core (schedules, diffusion, likelihood, samplers, models) imports with jax/flax/optax alone;
TensorFlow and tfds are imported lazily by the data code only.
"""
from diffusion_jax.schedules import (Schedule, evenly_spaced_timesteps, make_schedule, respace,
                                     schedule_from_betas)
from diffusion_jax.diffusion import (MeanVariance, ddim_step, eps_from_v, eps_from_x0,
                                     mean_channels, p_mean_variance, p_sample_step,
                                     predict_x0_eps, q_mean_variance, q_posterior, q_sample,
                                     q_step_sample, v_from_x0_eps, x0_from_eps, x0_from_v)
from diffusion_jax.likelihood import (discretized_gaussian_log_likelihood, nll_bpd, normal_kl,
                                      prior_bpd, vlb_terms_bpd)
from diffusion_jax.losses import loss_weight, snr, training_loss
from diffusion_jax.processes import make_process, process_names
from diffusion_jax.compilation_cache import enable_compilation_cache

__version__ = "0.1.0"
from diffusion_jax.samplers import decode, encode, sample, sampling_grid
