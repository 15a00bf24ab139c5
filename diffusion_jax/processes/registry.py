"""What a process is, and the table of them by name.

A process says, for a time t (an array of any shape; its members' own convention):
  * `marginal(t) -> (alpha, sigma)`: x_t = alpha x0 + sigma eps, float32, shaped like t;
  * `model_time(t)`: the time input the model sees (DDPM its integer timestep, EDM sigma
    itself, flow matching 1000 t, as diffusers and SD3 give it);
  * `t_noisy`, `t_clean`: the two ends of t; x at the noisy end is N(0, prior_std^2 I) (its
    alpha is 0, or negligible);
  * `default_grid(num_steps) -> float64 [num_steps + 1]`: the times a sampler walks, from
    t_noisy down to t_clean (host NumPy, static);
  * `training_time(u)`, `spread_time(u)`: u in (0, 1) onto the process's times, as the training
    time samplings (uniform, logit-normal, mode) draw them and as the evaluation spreads them;
  * `time_is_sigma`: whether t is sigma itself (alpha = 1: EDM), which EDM's churn, its
    log-normal sigma and its preconditioning need.
Adding a process is one file with a class of these and a `register(name, factory)` call; no
code outside it branches on a process's name.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from diffusion_jax.errors import UsageError


class Process(Protocol):
    name: str
    prior_std: float
    t_noisy: float
    t_clean: float
    time_is_sigma: bool

    def marginal(self, t): ...

    def model_time(self, t): ...

    def default_grid(self, num_steps: int) -> np.ndarray: ...

    def training_time(self, u): ...

    def spread_time(self, u): ...


_REGISTRY: dict[str, Callable[..., Process]] = {}


def register(name: str, factory: Callable[..., Process]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"a process named {name!r} is registered already")
    _REGISTRY[name] = factory


def process_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_process(name: str, **options) -> Process:
    """The process `name` with its options (see each member's module); bad options are errors."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown process {name!r}; choose one of {process_names()}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as error:  # an option the process does not take
        raise UsageError(f"process {name!r}: {error}") from None


def check_positive(name: str, **values) -> None:
    """UsageError naming the first option that is not a finite number > 0."""
    for key, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
                and value > 0):
            raise UsageError(f"process {name!r} option {key} = {value!r} must be a finite number > 0")
