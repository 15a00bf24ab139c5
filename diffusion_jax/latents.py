"""Latent diffusion: a run with `config.model.vae` (a diffusers AutoencoderKL directory or Hub
repository id) trains its backbone on the VAE's scaled latents and samples images through the
decoder.

    latents = scaling_factor * (z - shift_factor),  z ~ N(mean, exp(logvar)) of the encoder
    images  = decode(latents / scaling_factor + shift_factor)

Training encodes each batch on the fly (`encode_batches`: one posterior draw per image and step,
a pure function of (seed, step, process)), so the data pipeline, its shuffling and resuming are
those of pixel runs. The VAE is frozen: it is loaded from its directory, never checkpointed.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders import input_shape, vae_source
from diffusion_jax.errors import UsageError
from diffusion_jax.models.vae import sample_latent

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def load_vae(source: str):
    """The `Imported` VAE of a directory or repository id; a pipeline (a folder with vae/) is
    looked into. Cached: every user of a run's VAE shares one copy."""
    from diffusion_jax.interop import files, load_diffusers

    directory = files.resolve(source)
    subfolder = "vae" if not (directory / files.CONFIG).exists() and (directory / "vae" / files.CONFIG).exists() else None
    vae = load_diffusers(str(directory), subfolder)
    if type(vae.model).__name__ != "AutoencoderKL":
        raise UsageError(f"model.vae = {source!r} is a {vae.config.get('_class_name')}, not an AutoencoderKL")
    return vae


def model_input_shape(config) -> tuple:
    """(H, W, C) of one input of the run's model: the images', or for a latent run the latents'
    (its VAE loaded, once, to say them)."""
    return input_shape(config, load_vae(vae_source(config)).model if vae_source(config) else None)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, images, key):
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    return model.scaling_factor * (sample_latent(key, mean, logvar) - model.shift_factor)


def decode_latents(model, params, latents):
    """Images [B, H, W, C] of scaled latents [B, h, w, c] by the VAE `model` (traceable)."""
    return model.apply({"params": params}, latents / model.scaling_factor + model.shift_factor,
                       method=model.decode)


def encode_images(vae, images, key) -> np.ndarray:
    """Scaled latents [B, h, w, c] (NumPy) of images [B, H, W, C] in [-1, 1], one posterior draw each."""
    return np.asarray(_encode(vae.model, vae.params, jnp.asarray(images, jnp.float32), key))


class LatentBatches:
    """Batch i of a `data.pipeline.Batches` with its images encoded to scaled latents; the
    posterior noise is a function of (seed, step, process), so batch i stays a pure function of
    the seed and i."""

    def __init__(self, batches, config, process_index: int = 0):
        self.batches, self.process_index = batches, process_index
        self.vae = load_vae(vae_source(config))
        self.root = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x7AE)

    def __call__(self, step: int) -> dict:
        batch = dict(self.batches(step))
        key = jax.random.fold_in(jax.random.fold_in(self.root, int(step)), self.process_index)
        batch["image"] = encode_images(self.vae, batch["image"], key)
        return batch


__all__ = ["LatentBatches", "decode_latents", "encode_images", "load_vae", "model_input_shape", "vae_source"]
