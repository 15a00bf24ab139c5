"""Training: state, optimiser, sharded train step, checkpoints, loop."""
from diffusion_jax.training.config import base_config
from diffusion_jax.training.loop import NonFiniteLoss, Preempted, train
from diffusion_jax.training.state import TrainState, create_train_state, ema_decay
from diffusion_jax.training.step import jit_train_step, make_multi_step, make_train_step

__all__ = ["NonFiniteLoss", "Preempted", "TrainState", "base_config", "create_train_state",
           "ema_decay", "jit_train_step", "make_multi_step", "make_train_step", "train"]
