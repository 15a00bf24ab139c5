"""What a process is, and the table of them by name.

A process x_t = alpha(t) x0 + sigma(t) eps answers, for times t in its own convention:
  * `marginal(t) -> (alpha, sigma)`, shaped like t: float64 for NumPy (or Python) input, float32
    for JAX input (under jit);
  * `model_time(t)`: the time input its model sees (DDPM its integer timestep, EDM sigma, flow
    matching 1000 t, as diffusers and SD3 give it);
  * `time_at(s)`: the time whose noise level sigma / alpha is s (NumPy or JAX), and
    `ve_sigma_range()`: (min, max) of sigma / alpha over the times its model was trained at;
  * `own_grid(num_steps, **spacing) -> float64 [num_steps]`: its own sampling times, noisiest first
    (the clean end, alpha = 1 and sigma = 0, follows them); `default_sigmas(preferred)`: which grid
    a sampler that prefers `preferred` walks by default;
  * `snap(t)`: times onto those the model was trained at (DDPM: its integers);
  * `ode_frame`: k in the coordinates y = x / (alpha + k sigma), tau = sigma / (alpha + k sigma), in
    which the probability-flow ODE is linear (0: sigma / alpha, as k-diffusion; 1: flow matching's t);
  * `uniform_times(key, batch)`, `training_time(u)`: training times from u in (0, 1);
    `spread_times(n)`: n evaluation times spread evenly; `likelihood_times(n)`: the ODE likelihood's;
  * `prior_std`; `max_steps` (a grid's most steps: T for DDPM, None where unbounded).
Adding a process is one file with a class of these and a `register(name, factory)` call; no
code outside it branches on a process's name.
"""
from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError

T_MARGIN = 1e-5  # training times on [0, 1] stay this far inside it


class Process(Protocol):
    name: str
    prior_std: float
    ode_frame: float
    max_steps: int | None

    def marginal(self, t): ...

    def model_time(self, t): ...

    def time_at(self, ve_sigma): ...

    def own_grid(self, num_steps: int, **spacing) -> np.ndarray: ...


def on_host(t) -> bool:
    """Whether t is a host value (NumPy or Python), computed in float64, rather than a JAX array."""
    return isinstance(t, (np.ndarray, np.generic, int, float))


def array_of(t):
    """(module, t as its array): NumPy float64 for host values, jax.numpy float32 otherwise."""
    return (np, np.asarray(t, np.float64)) if on_host(t) else (jnp, jnp.asarray(t, jnp.float32))


class ContinuousTime:
    """What the processes of continuous time in [t_min, t_noisy] share."""

    max_steps = None
    ode_frame = 0.0

    def default_sigmas(self, preferred: str) -> str:
        """The grid of a sampler that prefers `preferred`: the process's own, but for the even spacing
        of the few-step samplers (meanflow, consistency: 1 -> 0.5 -> 0 in two steps on flow)."""
        return "uniform" if preferred == "uniform" else "process"

    def snap(self, t):
        return t

    def uniform_times(self, key, batch: int):
        u = jax.random.uniform(key, (batch,), jnp.float32)
        return self.training_time(jnp.clip(u, T_MARGIN, 1.0 - T_MARGIN))

    def training_time(self, u):
        return u

    def spread_times(self, n: int) -> np.ndarray:
        return self.spread_time((np.arange(n) + 0.5) / n)

    spread_time = training_time

    def near_clean(self, first: float) -> float:
        """The time the ODE likelihood starts at instead of the clean end itself."""
        return 1e-5

    def likelihood_times(self, num_steps: int) -> np.ndarray:
        """num_steps + 1 times from near the clean end up to the noisy end (ascending)."""
        times = np.append(0.0, self.own_grid(num_steps)[::-1])
        times[0] = self.near_clean(times[1])
        return times


_REGISTRY: dict[str, Callable[..., Process]] = {}
MAX_TERMINAL_SNR_ROOT = 0.1  # alpha / sigma at the noisy end: sampling starts from the prior


def register(name: str, factory: Callable[..., Process]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"a process named {name!r} is registered already")
    _REGISTRY[name] = factory


def process_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_process(name: str, **options) -> Process:
    """The process `name` with its options (see each member's module); bad options are errors,
    and so is a process whose noisy end keeps the signal (its prior would not be its marginal)."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown process {name!r}; choose one of {process_names()}")
    try:
        process = _REGISTRY[name](**options)
    except TypeError as error:  # an option the process does not take
        raise UsageError(f"process {name!r}: {error}") from None
    alpha, sigma = noisy_end(process)
    if alpha > MAX_TERMINAL_SNR_ROOT * sigma:
        raise UsageError(f"process {name!r} with {options or 'its defaults'} keeps alpha = {alpha:.3g} against "
                         f"sigma = {sigma:.3g} at its noisy end, so sampling from N(0, {process.prior_std:g}^2) would "
                         f"be wrong: choose options whose noisy end destroys the signal (alpha / sigma <= "
                         f"{MAX_TERMINAL_SNR_ROOT})")
    return process


def noisy_end(process) -> tuple[float, float]:
    """(alpha, sigma) of the process at its noisiest sampling time (float64)."""
    alpha, sigma = process.marginal(np.float64(process.own_grid(1)[0]))
    return float(alpha), float(sigma)


def check_positive(name: str, **values) -> None:
    """UsageError naming the first option that is not a finite number > 0."""
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
                and value > 0):
            raise UsageError(f"process {name!r} option {key} = {value!r} must be a finite number > 0")
