"""The discrete variance-preserving process of DDPM: a `Schedule`'s tables, t an integer index
in [0, T) (t_clean = -1 stands for x0 itself), the model sees `schedule.timesteps[t]`; and its
continuous-time view (`DDPMProcess.continuous()`), through which a DDPM model has a
probability-flow ODE and so an exact likelihood."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import gather
from diffusion_jax.processes.registry import register
from diffusion_jax.schedules import Schedule, make_schedule, spaced_timesteps


class _OfSchedule:
    """A process made of a `Schedule`, a pytree whose one child is the schedule."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def tree_flatten(self):
        return (self.schedule,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class DDPMProcess(_OfSchedule):
    """The "ddpm" process of `schedule` (a pytree: the schedule is its child)."""

    name = "ddpm"
    prior_std = 1.0
    t_clean = -1

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

    def continuous(self) -> "ContinuousDDPM":
        return ContinuousDDPM(self.schedule)


MIN_ABAR = 2.0 ** -24  # abar held at least here where a zero-terminal-SNR schedule has abar_T = 0 (as diffusers)


@jax.tree_util.register_pytree_node_class
class ContinuousDDPM(_OfSchedule):
    """A DDPM schedule in continuous time t in [0, 1]: the fractional index tau = t (T - 1), the
    log-SNR log(abar / (1 - abar)) linear in tau between the schedule's integer steps (the
    interpolation in log sigma of k-diffusion's and diffusers' sigma samplers), the model fed the
    timestep at tau, interpolated. At t = 0 sigma is the schedule's first, small but not 0: the
    likelihood is that of x at the first noise level, as score_sde's t_eps."""

    name = "ddpm_continuous"
    prior_std = 1.0
    t_clean, t_noisy = 0.0, 1.0
    time_is_sigma = False

    def _tau(self, t):
        return jnp.asarray(t, jnp.float32) * (self.schedule.num_timesteps - 1)

    def marginal(self, t):
        abar = jnp.clip(self.schedule.alphas_cumprod.astype(jnp.float32), MIN_ABAR, 1.0 - 2.0 ** -24)
        steps = jnp.arange(self.schedule.num_timesteps, dtype=jnp.float32)
        log_snr = jnp.interp(self._tau(t), steps, jnp.log(abar) - jnp.log1p(-abar))
        return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))

    def model_time(self, t):
        steps = jnp.arange(self.schedule.num_timesteps, dtype=jnp.float32)
        return jnp.interp(self._tau(t), steps, self.schedule.timesteps.astype(jnp.float32))

    def default_grid(self, num_steps: int) -> np.ndarray:
        """num_steps + 1 times evenly spaced from 1 down to 0."""
        return np.linspace(1.0, 0.0, int(num_steps) + 1)


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
