"""What a run's config builds: its Flax module, its schedule, the shape of one input, and the
`denoise_fn` closure of a model and its parameters. Models and schedules only, and no I/O (a
latent run's input shape is given the VAE module: `latents.model_input_shape` loads it)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.conditions import model_fields as condition_fields
from diffusion_jax.errors import UsageError
from diffusion_jax.models import create_model
from diffusion_jax.processes import make_process
from diffusion_jax.processes.edm import precondition
from diffusion_jax.schedules import Schedule, make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# Module fields a run decides outside model.overrides (`run_fields`), and fields of how a module
# computes rather than what it is: neither is part of a model's description (import, export).
RUN_FIELDS = ("dtype", "remat", "learn_sigma", "second_time", "num_classes", "cond_dim")
IMPLEMENTATION_FIELDS = ("parent", "name", "param_dtype", "attention_impl", "autodiff_ops", "ops_impl")


def run_fields(config) -> dict:
    """{field: value} of RUN_FIELDS for the run's module: dtype, remat, learned sigma and what its
    condition kind feeds the model (`conditions.model_fields`)."""
    if config.model.dtype not in DTYPES:
        raise UsageError(f"unknown model.dtype {config.model.dtype!r}; choose one of {sorted(DTYPES)}")
    fields = dict(dtype=DTYPES[config.model.dtype], remat=config.model.remat,
                  learn_sigma=config.diffusion.variance == "learned_range",
                  second_time=bool(config.model.get("second_time", False)), **condition_fields(config))
    assert tuple(fields) == RUN_FIELDS
    return fields


def build_model(config):
    """The Flax module of a run: the preset, its model.overrides, then the `run_fields`; an objective
    that differentiates the model in forward mode (`objectives.FORWARD_MODE`: jax.jvp) gets JAX's
    autodiff in place of the ops' hand-written gradients, which have no forward mode."""
    from diffusion_jax.objectives import FORWARD_MODE

    fields = {**dict(config.model.overrides), **run_fields(config)}
    if config.diffusion.get("objective", "denoise") in FORWARD_MODE:
        fields["autodiff_ops"] = True
    return create_model(config.model.name, **fields)


# The forward process must destroy the signal: sampling starts from N(0, I), which is q(x_T)
# only when abar_T is close to 0 (linear T = 1000: 4e-5; cosine: 0).
MAX_TERMINAL_ABAR = 0.01


def build_schedule(config) -> Schedule:
    """The run's schedule, checked usable: abar at t = T below MAX_TERMINAL_ABAR, and (with
    eps-prediction, where x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)) above 0."""
    d = config.diffusion
    schedule = make_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=bool(d.get("zero_terminal_snr", False)),
                             **dict(d.get("schedule_options", {})))
    last = float(np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[-1])
    where = f"the {d.schedule} schedule with T = {d.num_timesteps}"
    if last > MAX_TERMINAL_ABAR:
        raise UsageError(f"{where} keeps {100 * np.sqrt(last):.0f}% of the signal's scale at t = T "
                         f"(abar_T = {last:.3g}), so sampling from pure noise would be wrong: use more "
                         "timesteps (diffusion.num_timesteps) or another schedule")
    if last == 0.0 and d.get("zero_terminal_snr", False) and d.prediction == "eps":
        raise UsageError(f"{where} is rescaled to zero terminal SNR (abar_T = 0): the model sees pure "
                         "noise at t = T, where a noise prediction says nothing about x0; use "
                         "diffusion.prediction='v' (Lin et al. 2023) or zero_terminal_snr=False")
    if last == 0.0 and d.prediction == "eps":
        raise UsageError(f"{where} reaches beta = 1 (abar_T = 0), where x0 cannot be recovered from a "
                         "noise prediction: use more timesteps (the linear schedule's betas scale with "
                         "1000 / T, so T > 20) or diffusion.prediction='v'")
    return schedule


def vae_source(config) -> str:
    """The run's VAE directory or repository id ("" for a pixel-space run)."""
    return str(config.model.get("vae", "") or "")


def build_process(config):
    """The run's forward process: DDPM's `Schedule` (`build_schedule`, what every run before the
    continuous processes used) or a continuous process (diffusion.process, its process_options)."""
    name = config.diffusion.get("process", "ddpm")
    if name == "ddpm":
        if dict(config.diffusion.get("process_options", {})):
            raise UsageError(f"diffusion.process_options {dict(config.diffusion.process_options)} are a continuous "
                             "process's: a ddpm run's schedule is diffusion.schedule, num_timesteps, schedule_options "
                             "and zero_terminal_snr; drop them, or set --config.diffusion.process=vp|edm|flow")
        return build_schedule(config)
    return make_process(name, **dict(config.diffusion.get("process_options", {})))


def precondition_of(config):
    """sigma_data when the run wraps its backbone in EDM's preconditioning (model.precondition), else None."""
    if config.model.get("precondition", "") != "edm":
        return None
    return float(dict(config.diffusion.get("process_options", {})).get("sigma_data", 0.5))


def input_shape(config, vae=None) -> tuple:
    """(H, W, C) of one model input: the images', or for a latent run (config.model.vae) their
    latents' under `vae`, the run's AutoencoderKL module (which says its factor and channels)."""
    size, channels = int(config.data.image_size), int(config.data.channels)
    if not vae_source(config):
        return (size, size, channels)
    if vae is None:
        raise ValueError("a latent run's input shape needs its VAE module: use latents.model_input_shape(config)")
    factor = vae.downsample_factor
    if size % factor:
        raise UsageError(f"data.image_size {size} is not a multiple of the VAE's downsampling factor {factor}: "
                         f"use a multiple of {factor}")
    if channels != vae.in_channels:
        raise UsageError(f"data.channels is {channels} but the VAE encodes {vae.in_channels}-channel "
                         "images: set data.channels to match")
    return (size // factor, size // factor, vae.latent_channels)


def denoise_fn_for(model, params, conditional: bool, sigma_data=None):
    """The `denoise_fn(x_t, t[, y], **r)` closure of a model and its parameters (inference mode; a
    two-time model's second time as r=); with `sigma_data` (`precondition_of`), inside EDM's
    preconditioning."""
    fn = ((lambda x, t, y, **r: model.apply({"params": params}, x, t, y, **r)) if conditional
          else (lambda x, t, **r: model.apply({"params": params}, x, t, **r)))
    return fn if sigma_data is None else precondition(fn, sigma_data)
