"""The discrete variance-preserving process of DDPM, a `Schedule` as a process: t is an index in
[0, T) (the model sees `schedule.timesteps[t]`); at integer t the marginals are the schedule's
own numbers, between them the log-SNR log(abar / (1 - abar)) is linear in t (the interpolation in
log sigma of k-diffusion's and diffusers' sigma samplers, which gives a DDPM model fractional
timesteps and a probability-flow ODE). Its grids are diffusers' timestep spacings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.registry import on_host, register
from diffusion_jax.schedules import SPACINGS, Schedule, gather, make_schedule, spaced_timesteps

MIN_ABAR = 2.0 ** -24  # abar held here between steps and in sigma grids where abar_T = 0 (as diffusers)
POINTS = ("steps", "steps+1")  # DPMSolverMultistep and UniPC space num_steps + 1 points, then drop the last


@jax.tree_util.register_pytree_node_class
class DDPMProcess:
    """The "ddpm" process of `schedule` (a pytree whose one child is the schedule)."""

    name = "ddpm"
    prior_std = 1.0
    ode_frame = 0.0

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def tree_flatten(self):
        return (self.schedule,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def max_steps(self) -> int:
        return self.schedule.num_timesteps

    def _log_abar64(self) -> np.ndarray:
        return np.cumsum(np.log1p(-np.asarray(self.schedule.betas, np.float64)))

    def _log_sigmas(self, xp):
        """log(sigma / alpha) [T], increasing, with abar held at MIN_ABAR (float64 or float32)."""
        abar = np.exp(self._log_abar64()) if xp is np else self.schedule.alphas_cumprod
        abar = xp.clip(abar, MIN_ABAR, 1.0 - 2.0 ** -24)
        return 0.5 * (xp.log1p(-abar) - xp.log(abar))

    def marginal(self, t):
        """(alpha, sigma): integer t, the schedule's (on the host from its betas in float64; under
        jit its float32 tables, the very numbers `q_sample` uses, NaN outside [0, T)); between
        integers, interpolated in log-SNR."""
        if on_host(t):
            t = np.asarray(t, np.float64)
            log_abar = self._log_abar64()[np.clip(np.round(t), 0, self.max_steps - 1).astype(np.int64)]
            whole = (t == np.round(t)) & (t >= 0) & (t <= self.max_steps - 1)
            log_sigma = np.interp(t, np.arange(self.max_steps), self._log_sigmas(np))
            with np.errstate(divide="ignore"):
                alpha = np.where(whole, np.exp(0.5 * log_abar), (1.0 + np.exp(2.0 * log_sigma)) ** -0.5)
                sigma = np.where(whole, np.sqrt(-np.expm1(log_abar)), (1.0 + np.exp(-2.0 * log_sigma)) ** -0.5)
            outside = (t < 0) | (t > self.max_steps - 1)
            return np.where(outside, np.nan, alpha), np.where(outside, np.nan, sigma)
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return gather(self.schedule.sqrt_alphas_cumprod, t), gather(self.schedule.sqrt_one_minus_alphas_cumprod, t)
        log_sigma = jnp.interp(t, jnp.arange(self.max_steps, dtype=jnp.float32), self._log_sigmas(jnp))
        return jax.nn.sigmoid(-2.0 * log_sigma) ** 0.5, jax.nn.sigmoid(2.0 * log_sigma) ** 0.5

    def model_time(self, t):
        if on_host(t):
            return np.interp(np.asarray(t, np.float64), np.arange(self.max_steps), np.asarray(self.schedule.timesteps))
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return jnp.take(self.schedule.timesteps, t, axis=0)
        steps = jnp.arange(self.max_steps, dtype=jnp.float32)
        return jnp.interp(t, steps, self.schedule.timesteps.astype(jnp.float32))

    def time_at(self, ve_sigma):
        """The fractional index whose sigma / alpha is `ve_sigma` (clipped to [0, T - 1])."""
        xp = np if on_host(ve_sigma) else jnp
        steps = xp.arange(self.max_steps, dtype=np.float64 if xp is np else jnp.float32)
        return xp.interp(xp.log(xp.maximum(ve_sigma, 1e-10)), self._log_sigmas(xp), steps)

    def ve_sigma_range(self) -> tuple[float, float]:
        log_sigmas = self._log_sigmas(np)
        return float(np.exp(log_sigmas[0])), float(np.exp(log_sigmas[-1]))

    def default_sigmas(self, preferred: str) -> str:
        return "process" if preferred == "uniform" else preferred  # "uniform" spaces continuous times

    def own_grid(self, num_steps: int, spacing: str = "linspace", steps_offset: int = 0, points: str = "steps",
                 fractional: bool = False) -> np.ndarray:
        """num_steps indices, noisiest first, as diffusers' `timestep_spacing` chooses them (with
        `steps_offset` on "leading"); `points` "steps+1" spaces one more and drops the last
        (DPMSolverMultistep, UniPC); `fractional` keeps linspace unrounded (Euler's schedulers)."""
        T, n = self.max_steps, int(num_steps)
        if spacing not in SPACINGS or points not in POINTS:
            raise UsageError(f"unknown spacing {spacing!r} / points {points!r}: choose from {SPACINGS} and {POINTS}")
        if spacing == "trailing" or (points == "steps" and not (fractional and spacing == "linspace")):
            t = spaced_timesteps(T, n, spacing)[::-1].astype(np.float64)
        elif fractional:
            t = np.linspace(0.0, T - 1.0, n)[::-1]
        elif spacing == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        else:
            t = (np.arange(0, n + 1) * (T // (n + 1)))[::-1][:-1].astype(np.float64)
        return t + steps_offset if spacing == "leading" else t

    def snap(self, t) -> np.ndarray:
        """Host times onto the nearest integer timesteps, noisiest first, each once."""
        return np.unique(np.round(np.asarray(t, np.float64)))[::-1]

    def uniform_times(self, key, batch: int):
        return jax.random.randint(key, (batch,), 0, self.max_steps)

    def training_time(self, u):
        return jnp.clip(jnp.floor(u * self.max_steps), 0, self.max_steps - 1).astype(jnp.int32)

    def spread_times(self, n: int) -> np.ndarray:
        return (np.arange(n) * self.max_steps) // n

    def likelihood_times(self, num_steps: int) -> np.ndarray:
        """num_steps + 1 fractional indices from 1e-5 (T - 1) (the first step's noise level: the
        likelihood of x at it, as score_sde's t_eps) to T - 1."""
        times = np.linspace(0.0, 1.0, int(num_steps) + 1) * (self.max_steps - 1)
        times[0] = 1e-5 * (self.max_steps - 1)
        return times


def ddpm_process(schedule: str = "linear", num_timesteps: int = 1000, zero_terminal_snr: bool = False,
                 **schedule_options) -> DDPMProcess:
    return DDPMProcess(make_schedule(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr,
                                     **schedule_options))


def as_process(process_or_schedule):
    """A process; a `Schedule` becomes the "ddpm" process of its tables (bitwise the same)."""
    return DDPMProcess(process_or_schedule) if isinstance(process_or_schedule, Schedule) else process_or_schedule


register("ddpm", ddpm_process)
