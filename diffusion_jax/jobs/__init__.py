"""Batch jobs over every process and host: `generate` (N samples of a run as verified, resumable
shards). Each resumes where it stopped and refuses a directory claimed by another job."""
from diffusion_jax.jobs.generate import generate_samples

__all__ = ["generate_samples"]
