"""The sampler registry: what a sampler is, and the table of them by name.

A sampler is three pure pieces the driver (`samplers.sample`) runs in one `lax.scan`:

  * `make_grid(schedule, num_steps, **grid_options) -> Grid`: its K steps, computed on the host
    in float64 NumPy (static: a new grid is a new program);
  * `init_state(x) -> state`: what it carries between steps (a pytree, {} for most);
  * `step(ctx, x, state, inputs, key) -> (x_next, state, x0)`: one step of the chain.

Every sampler walks the variance-preserving state x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, so
the wrappers (inpainting, RePaint, SDEdit, the trajectory buffer) work with any of them:
`Grid.signal` / `Grid.noise` give sqrt(abar) / sqrt(1 - abar) of the state before each step.

Adding a sampler is one `register(Sampler(...))` in the module that defines it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.schedules import Schedule


class Grid(NamedTuple):
    """A sampler's K steps, noisiest first (NumPy arrays, fixed when the sampler is traced).

    schedule: the schedule the step reads (a respaced one for "ddpm", else the model's).
    steps: per-step arrays [K] the scan walks over (the sampler's own names).
    model_t: [K] the model timestep of each step's (first) model call.
    signal, noise: [K + 1] float32 sqrt(abar) and sqrt(1 - abar) of the state before each step;
      entry K is the state after the last step, (1, 0) for a chain that ends at x0.
    """

    schedule: Schedule
    steps: dict
    model_t: np.ndarray
    signal: np.ndarray
    noise: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.model_t)

    def starting_at(self, start_step) -> "Grid":
        """The grid without the steps above model timestep `start_step` (SDEdit)."""
        keep = int(np.argmax(self.model_t <= start_step)) if np.any(self.model_t <= start_step) else None
        if keep is None:
            raise UsageError(f"start_step {start_step} is below the first sampling step "
                             f"(the last one is at model timestep {self.model_t[-1]})")
        return Grid(self.schedule, {k: v[keep:] for k, v in self.steps.items()}, self.model_t[keep:],
                    self.signal[keep:], self.noise[keep:])


class StepContext(NamedTuple):
    """What every step of one chain shares (closed over by the scan).

    model: (x_t [B, ...], model timestep [B]) -> model output, guidance applied.
    normal: key -> standard normal noise of the batch's shape (and sharding).
    options: the sampler's traced options (eta, s_churn, ...), as jnp scalars.
    """

    model: Callable
    schedule: Schedule
    prediction: str
    variance: str
    clip_x0: bool
    num_steps: int
    normal: Callable
    options: dict


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of a sampler: its default and the values it takes, declared once.

    A name option takes one of `choices`; a number option takes a real number (a string that
    reads as one, as the command line gives it, is converted) in [minimum, maximum], above
    `minimum` when `open_below`, infinite only with `infinite`. A traced value (an option
    swept under jit) is passed on unchecked.
    """

    default: Any
    choices: tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    open_below: bool = False
    infinite: bool = False
    steps: bool = False  # a list of model timesteps (integers, strictly decreasing, >= 0)

    def check(self, sampler: str, name: str, value):
        """`value` converted (a number option gives a float), or a ValueError naming the option."""
        where = f"sampler {sampler!r} option {name}"
        if self.steps:
            return _check_steps(where, value)
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
        if math.isnan(number) or (math.isinf(number) and not self.infinite) or below or number > high:
            bounds = f"{'(' if self.open_below else '['}{low:g}, {high:g}]"
            raise UsageError(f"{where} = {value!r} is out of range: it takes a {'' if self.infinite else 'finite '}"
                             f"number in {bounds}")
        return number


def _check_steps(where: str, value):
    if value is None:
        return None
    values = np.asarray(value)
    if values.ndim != 1 or len(values) == 0 or not np.issubdtype(values.dtype, np.integer) \
            or np.any(values < 0) or np.any(np.diff(values) >= 0):
        raise UsageError(f"{where} = {value!r} must be a list of integer timesteps, strictly decreasing, >= 0")
    return tuple(int(v) for v in values)


def timesteps() -> Option:
    """The model timesteps to visit, given explicitly (a scheduler's own `set_timesteps`); None:
    the grid of the other options."""
    return Option(None, steps=True)


def number(default: float, **limits) -> Option:
    return Option(default, **limits)


def name(default: str, choices) -> Option:
    return Option(default, choices=tuple(choices))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampling method. `grid_options` (static) and `step_options` (traced) are the keyword
    options it accepts ({name: Option}); `default_steps(T)` its step count when none is given;
    `model_calls(K)` how many model evaluations K steps cost."""

    name: str
    make_grid: Callable
    step: Callable
    default_steps: Callable
    init_state: Callable = lambda x: {}
    grid_options: dict = dataclasses.field(default_factory=dict)
    step_options: dict = dataclasses.field(default_factory=dict)
    model_calls: Callable = lambda k: k

    def options(self) -> dict:
        """{name: Option} of every option this sampler takes."""
        return {**self.grid_options, **self.step_options}

    def check_options(self, options: dict) -> dict:
        """The options, each checked and converted by its declaration; an option this sampler
        does not take is an error naming the ones it does."""
        declared = self.options()
        unknown = set(options) - set(declared)
        if unknown:
            raise UsageError(f"sampler {self.name!r} has no option(s) {sorted(unknown)}; "
                             f"it takes {sorted(declared) or 'none'}")
        return {k: declared[k].check(self.name, k, v) for k, v in options.items()}

    def split_options(self, options: dict) -> tuple[dict, dict]:
        """(grid options, step options) from user options, checked, defaults filled in."""
        options = self.check_options(options)
        grid = {k: options.get(k, o.default) for k, o in self.grid_options.items()}
        step = {k: options.get(k, o.default) for k, o in self.step_options.items()}
        return grid, step


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


def concrete_schedule(schedule: Schedule) -> Schedule:
    """The schedule, checked to hold values (grids are computed from it on the host)."""
    try:
        np.asarray(schedule.betas)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise UsageError(
            "the schedule is traced: close over it (functools.partial(sample, denoise_fn, "
            "schedule, shape, ...)) instead of passing it as a jit argument, so the step grid "
            "can be computed in float64 at trace time") from None
    return schedule


def check_num_steps(num_steps: int, limit: int, what: str) -> int:
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= limit:
        raise UsageError(f"num_steps must be in [1, {limit}] for {what}, got {num_steps}")
    return int(num_steps)
