"""The discrete variance-preserving process of DDPM: a `Schedule`'s tables, t an integer index
in [0, T) (t_clean = -1 stands for x0 itself), the model sees `schedule.timesteps[t]`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import gather
from diffusion_jax.processes.registry import register
from diffusion_jax.schedules import Schedule, make_schedule, spaced_timesteps


@jax.tree_util.register_pytree_node_class
class DDPMProcess:
    """The "ddpm" process of `schedule` (a pytree: the schedule is its child)."""

    name = "ddpm"
    prior_std = 1.0
    t_clean = -1

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def tree_flatten(self):
        return (self.schedule,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def t_noisy(self) -> int:
        return self.schedule.num_timesteps - 1

    def marginal(self, t):
        """(sqrt(abar_t), sqrt(1 - abar_t)) gathered from the schedule's float32 tables (NaN
        outside [0, T)): the very numbers `q_sample` uses."""
        t = jnp.asarray(t)
        return gather(self.schedule.sqrt_alphas_cumprod, t), gather(self.schedule.sqrt_one_minus_alphas_cumprod, t)

    def model_time(self, t):
        return jnp.take(self.schedule.timesteps, jnp.asarray(t), axis=0)

    def default_grid(self, num_steps: int) -> np.ndarray:
        """num_steps indices (linspace spacing), noisiest first, then -1 (x0)."""
        steps = spaced_timesteps(self.schedule.num_timesteps, num_steps, "linspace")[::-1]
        return np.append(steps, -1).astype(np.float64)


def ddpm_process(schedule: str = "linear", num_timesteps: int = 1000, zero_terminal_snr: bool = False,
                 **schedule_options) -> DDPMProcess:
    return DDPMProcess(make_schedule(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr,
                                     **schedule_options))


def ddpm_schedule(process_or_schedule):
    """The `Schedule` of a "ddpm" process, or of a Schedule itself; None for a continuous process.
    The one test the DDPM code paths (loss, samplers, sampler settings) make to take a process."""
    if isinstance(process_or_schedule, DDPMProcess):
        return process_or_schedule.schedule
    return process_or_schedule if isinstance(process_or_schedule, Schedule) else None


def as_process(process_or_schedule):
    """A process; a `Schedule` becomes the "ddpm" process of its tables (bitwise the same)."""
    return DDPMProcess(process_or_schedule) if isinstance(process_or_schedule, Schedule) else process_or_schedule


register("ddpm", ddpm_process)
