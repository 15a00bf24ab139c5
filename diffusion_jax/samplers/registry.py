"""The sampler registry: what a sampler is, its options, and the table of them by name.

A sampler is a step the driver (`samplers.sample`) runs for each of a grid's K steps, in the
(alpha, sigma) form that serves every process:

  step(ctx, x, state, level, key) -> (x_next, state, x0)

`level` holds the step's two levels (`StepLevel`); `ctx` the model, the process, the traced step
count and options (`StepContext`); `state` what it carries between steps (`init_state(x)`).
Its options are declared once (`Option`: default and range), the grid options (`grids.py`)
are every sampler's. Adding a sampler is one module that calls `register(Sampler(...))`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from diffusion_jax.errors import UsageError

BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class StepLevel(NamedTuple):
    """One step from level i to level i + 1 (scalars): times t, alpha, sigma, model times, the
    forward kernel's variance `var` between the two, the step index i."""

    t: Any
    alpha: Any
    sigma: Any
    model_t: Any
    t_next: Any
    alpha_next: Any
    sigma_next: Any
    model_t_next: Any
    var: Any
    i: Any


class StepContext(NamedTuple):
    """What every step of one chain shares.

    model: (x_t [B, ...], model time [B]) -> output, guidance applied. process: the process.
    prediction, clip_x0: what the output means, and whether x0 is clipped to [-1, 1].
    num_steps: K (an int, or traced). normal: key -> standard normal noise like x.
    options: the sampler's options (traced numbers as jnp scalars).
    """

    model: Callable
    process: Any
    prediction: str
    clip_x0: bool
    num_steps: Any
    normal: Callable
    options: dict


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option: its default and the values it takes, declared once.

    A name option takes one of `choices`; a flag option (`flag`) True or False (also "true",
    "false", "1", "0", "yes", "no"); a number option a real number (or a string that reads as
    one, as the command line gives it) in [minimum, maximum], above `minimum` when `open_below`,
    infinite only with `infinite`, whole with `integer`. `traced`: the steps read it as a traced
    value (a value traced under jit is passed on unchecked); the others fix the program.
    """

    default: Any
    choices: tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    open_below: bool = False
    infinite: bool = False
    integer: bool = False
    flag: bool = False
    steps: bool = False  # a list of times, strictly decreasing, >= 0
    traced: bool = False

    def check(self, sampler: str, key: str, value):
        """`value` converted, or a UsageError naming the option."""
        where = f"sampler {sampler!r} option {key}"
        if value is None and self.default is None:
            return None
        if self.steps:
            values = np.asarray(value, np.float64) if np.ndim(value) == 1 and len(value) else None
            if values is None or np.any(values < 0) or np.any(np.diff(values) >= 0):
                raise UsageError(f"{where} = {value!r} must be a list of times, strictly decreasing, >= 0")
            return tuple(float(v) for v in values)
        if self.flag:
            word = str(value).strip().lower()
            if not isinstance(value, (bool, np.bool_)) and word not in BOOLEANS:
                raise UsageError(f"{where} = {value!r} must be true or false")
            return bool(value) if isinstance(value, (bool, np.bool_)) else BOOLEANS[word]
        if self.choices:
            if value not in self.choices:
                raise UsageError(f"{where} = {value!r} is not one it takes: choose one of {list(self.choices)}")
            return value
        if isinstance(value, jax.core.Tracer):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str, np.number, np.ndarray, jax.Array)):
            raise UsageError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a number, got {value!r}") from None
        low = -math.inf if self.minimum is None else self.minimum
        high = math.inf if self.maximum is None else self.maximum
        below = number <= low if self.open_below else number < low
        if math.isnan(number) or (math.isinf(number) and not self.infinite) or below or number > high \
                or (self.integer and number != round(number)):
            bounds = f"{'(' if self.open_below else '['}{low:g}, {high:g}]"
            kind = "whole" if self.integer else ("" if self.infinite else "finite")
            raise UsageError(f"{where} = {value!r} is out of range: it takes a {kind} number in {bounds}".replace("a  ", "a "))
        return int(number) if self.integer else number


def number(default: float, **limits) -> Option:
    return Option(default, **limits)


def traced(default: float, **limits) -> Option:
    return Option(default, traced=True, **limits)


def name(default: str, choices) -> Option:
    return Option(default, choices=tuple(choices))


def flag(default: bool) -> Option:
    return Option(default, flag=True)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampling method: its step, its own `options` ({name: Option}), its defaults of the grid
    options (`grid_defaults`, e.g. sigmas="karras" where the process lets a sampler choose), its
    step count when none is given (`default_steps`; None: all of the process's), how many model
    evaluations K steps cost (`model_calls`), and a check of its options together (`check_options`:
    raises a UsageError, e.g. an empty churn window)."""

    name: str
    step: Callable
    default_steps: Optional[int]
    options: dict = dataclasses.field(default_factory=dict)
    grid_defaults: dict = dataclasses.field(default_factory=dict)
    init_state: Callable = lambda x: ()
    model_calls: Callable = lambda k: k
    check_options: Callable = lambda method, options: None


_REGISTRY: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    if sampler.name in _REGISTRY:
        raise ValueError(f"a sampler named {sampler.name!r} is registered already")
    _REGISTRY[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> Sampler:
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of {sampler_names()}")
    return _REGISTRY[name]


def sampler_names() -> tuple[str, ...]:
    """The registered samplers' names, in registration order."""
    return tuple(_REGISTRY)
