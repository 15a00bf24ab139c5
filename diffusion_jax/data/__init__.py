"""Data: in-memory image sources (digits, folders, tfds) and deterministic per-process batches."""
from diffusion_jax.data.pipeline import Batches, prefetch
from diffusion_jax.data.sources import ImageData, load_digits, load_split

__all__ = ["Batches", "ImageData", "load_digits", "load_split", "prefetch"]
