"""Training objectives beside the denoising loss (`losses.training_loss`), each in its own module:
MeanFlow's average-velocity loss (`meanflow`)."""
from diffusion_jax.objectives.meanflow import meanflow_loss

OBJECTIVES = {"meanflow": meanflow_loss}

__all__ = ["OBJECTIVES", "meanflow_loss"]
