"""Training: state, optimiser, sharded train step, checkpoints, loop."""
from diffusion_jax.errors import NoUsableCheckpoint, NonFiniteLoss, Preempted, WorkdirLocked
from diffusion_jax.config import base_config, validate_config
from diffusion_jax.training.loop import train
from diffusion_jax.training.state import TrainState, create_train_state, ema_decay
from diffusion_jax.training.step import jit_train_step, make_multi_step, make_train_step

__all__ = ["NoUsableCheckpoint", "NonFiniteLoss", "Preempted", "TrainState", "WorkdirLocked", "base_config",
           "create_train_state", "ema_decay", "jit_train_step", "make_multi_step", "make_train_step", "train",
           "validate_config"]
