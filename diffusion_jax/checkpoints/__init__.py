"""Checkpoints of a train state, below training and the read-only commands alike: the Orbax store
with its restore path (`store`), how a state's arrays are laid out in it (`packing`), and what
makes a saved state trustworthy (`integrity`)."""
from diffusion_jax.checkpoints.integrity import StateSummary, abstract_like, named_shapes, summarize
from diffusion_jax.checkpoints.store import Checkpointer
from diffusion_jax.errors import CheckpointMismatch

__all__ = ["CheckpointMismatch", "Checkpointer", "StateSummary", "abstract_like", "named_shapes", "summarize"]
