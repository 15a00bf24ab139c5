"""What a run's config builds: its Flax module, its schedule, the shape of one input, and the
`denoise_fn` closure of a model and its parameters. A leaf: models and schedules only."""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.models import create_model
from diffusion_jax.schedules import Schedule, make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def num_model_classes(config) -> int:
    """Classes the model is conditioned on: data.num_classes with data.use_labels, else 0."""
    return int(config.data.num_classes) if config.data.use_labels else 0


def build_model(config):
    """The Flax module of a run: the preset, with dtype, remat, labels and learned sigma."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {config.model.dtype!r}; choose one of {sorted(DTYPES)}")
    overrides = dict(config.model.overrides)
    overrides.update(dtype=DTYPES[config.model.dtype], remat=config.model.remat,
                     learn_sigma=config.diffusion.variance == "learned_range",
                     num_classes=num_model_classes(config))
    return create_model(config.model.name, **overrides)


def build_schedule(config) -> Schedule:
    return make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def input_shape(config) -> tuple:
    """(H, W, C) of one model input."""
    return (config.data.image_size, config.data.image_size, config.data.channels)


def denoise_fn_for(model, params, with_labels: bool):
    """The `denoise_fn(x_t, t[, y])` closure of a model and its parameters (inference mode)."""
    if with_labels:
        return lambda x, t, y: model.apply({"params": params}, x, t, y)
    return lambda x, t: model.apply({"params": params}, x, t)
