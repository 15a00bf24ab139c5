"""The noise levels a sampler walks, for any process, computed on the host in float64.

`sigmas` chooses the grid (each usable with any sampler and process):
  * "process": the process's own (`own_grid`): DDPM's integer timesteps by diffusers' `spacing`
    ("linspace", "leading" with `steps_offset`, "trailing"; `points` "steps+1": DPMSolverMultistep's
    and UniPC's), EDM's rho steps, diffusers' FlowMatchEuler times, VP's uniform times;
  * "model": the same, linspace unrounded (diffusers' Euler schedulers' fractional timesteps);
  * "karras" (`rho`), "exponential": K noise levels sigma / alpha between the process's least and
    most noisy ones (k-diffusion), "logsnr": the exponential levels snapped to the model's own
    timesteps (DPM-Solver's grid for discrete-time models);
  * "lcm": the Latent Consistency Model's skipping timesteps (diffusers' LCMScheduler): of the
    `original_steps` timesteps k - 1, 2k - 1, ..., T - 1 (k = T // original_steps), K evenly
    spaced by index from the noisiest;
  * "uniform": a continuous process's times evenly spaced from its noisiest sampling time to 0,
    t_max (1 - k / K) (few-step generators: MeanFlow's 1 -> 0.5 -> 0);
  * `timesteps`: the times given, noisiest first.
Then the clean end (alpha = 1, sigma = 0), or with `last_step_to="t0"` the level of time 0
(Stable Diffusion's DDIM, set_alpha_to_one=False). `max_steps` tabulates the grids of every step
count up to it, so a traced `num_steps` picks one (`GridTable`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.ddpm import MIN_ABAR, POINTS
from diffusion_jax.processes.edm import karras_sigmas
from diffusion_jax.samplers.registry import Option, name, number
from diffusion_jax.schedules import SPACINGS

SIGMAS = ("process", "model", "karras", "exponential", "logsnr", "lcm", "uniform")
LAST_STEPS = ("x0", "t0")
GRID_OPTIONS = {"sigmas": name("process", SIGMAS), "spacing": name("linspace", SPACINGS + ("logsnr",)),
                "steps_offset": number(0, minimum=0, integer=True), "points": name("steps", POINTS),
                "rho": number(7.0, minimum=0.0, open_below=True), "timesteps": Option(None, steps=True),
                "last_step_to": name("x0", LAST_STEPS), "max_steps": Option(None, minimum=1, integer=True),
                "original_steps": number(50, minimum=1, integer=True)}


class Grid(NamedTuple):
    """K steps between K + 1 levels, noisiest first (float32 [K + 1] each, `var` [K]).

    t: the process's times (the clean end: NaN); alpha, sigma: x = alpha x0 + sigma eps at each
    level; model_t: the model's time input there (0 at the clean end, never asked); var: the
    forward kernel's variance from level i + 1 up to level i, sigma_i^2 - (alpha_i / alpha_{i+1})^2
    sigma_{i+1}^2 (float64 before rounding: DDPM's beta_t on its own steps).
    """

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    model_t: np.ndarray
    var: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.var)

    def starting_at(self, start_step) -> "Grid":
        """The grid without the levels above model time `start_step` (SDEdit)."""
        below = np.nonzero(self.model_t[:-1] <= start_step)[0]
        if len(below) == 0:
            raise UsageError(f"start_step {start_step!r} is below every step of the grid (its last model time is "
                             f"{self.model_t[-2]:g}): give a larger one, in the model's time units")
        return Grid(*(a[below[0]:] for a in self))


def check_num_steps(num_steps, limit) -> int:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1 \
            or (limit is not None and num_steps > limit):
        raise UsageError(f"num_steps must be an integer in [1, {limit or 'inf'}], got {num_steps!r}")
    return int(num_steps)


def lcm_times(process, K: int, original_steps: int) -> np.ndarray:
    """The "lcm" grid's K timesteps, noisiest first (module docstring)."""
    if process.max_steps is None:
        raise UsageError(f"sigmas='lcm' chooses among a model's integer timesteps: the {process.name!r} process has "
                         "none (it has its own grid)")
    T = process.max_steps
    if original_steps > T or K > original_steps:
        raise UsageError(f"the LCM grid takes at most original_steps = {original_steps} of the {T} timesteps: "
                         f"{K} steps do not fit (give num_steps <= original_steps <= {T})")
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original_steps, K, endpoint=False)).astype(np.int64)].astype(np.float64)


def steps_bound(process, sigmas: str = "process", original_steps: int = 50, **_) -> int | None:
    """The most steps a grid of these options has (None: unbounded)."""
    return min(process.max_steps, original_steps) if sigmas == "lcm" and process.max_steps else process.max_steps


def _times(process, K, sigmas, spacing, steps_offset, points, rho, timesteps, original_steps):
    if original_steps != GRID_OPTIONS["original_steps"].default and sigmas != "lcm":
        raise UsageError(f"original_steps shapes the LCM grid: it needs sigmas='lcm' (got sigmas={sigmas!r})")
    if timesteps is not None:
        if len(timesteps) != K:
            raise UsageError(f"{len(timesteps)} timesteps given for num_steps = {K}: give one per step")
        return np.asarray(timesteps, np.float64)
    spaced = {k: v for k, v in (("spacing", spacing), ("steps_offset", steps_offset), ("points", points))
              if v != GRID_OPTIONS[k].default}
    if sigmas == "lcm" and not spaced:
        return lcm_times(process, K, original_steps)
    if sigmas == "uniform" and not spaced:
        if process.max_steps is not None:
            raise UsageError(f"sigmas='uniform' spaces a continuous process's times evenly: the {process.name!r} process "
                             "has integer timesteps (its own grid, sigmas='process', spaces them)")
        return float(process.own_grid(1)[0]) * (1.0 - np.arange(K, dtype=np.float64) / K)
    if sigmas in ("process", "model"):
        if process.max_steps is None and spaced:
            raise UsageError(f"{sorted(spaced)} choose among integer timesteps: the {process.name!r} process has "
                             "none (it has its own grid)")
        if process.max_steps is None:
            return process.own_grid(K)
        return process.own_grid(K, fractional=sigmas == "model", **spaced)
    if spaced:
        raise UsageError(f"{sorted(spaced)} choose the model's timesteps: they need sigmas='process' or 'model' "
                         f"(got sigmas={sigmas!r})")
    low, high = process.ve_sigma_range()
    if not math.isfinite(high):
        raise UsageError(f"sigmas={sigmas!r} spans the noise levels sigma / alpha, which the {process.name!r} process "
                         "takes to infinity at its noisy end: use its own grid (sigmas='process')")
    if sigmas == "karras":
        return process.time_at(karras_sigmas(low, high, K, rho))
    times = process.time_at(np.exp(np.linspace(math.log(high), math.log(low), K)))
    return process.snap(times) if sigmas == "logsnr" else times


def make_grid(process, num_steps, sigmas: str = "process", spacing: str = "linspace", steps_offset: int = 0,
              points: str = "steps", rho: float = 7.0, timesteps=None, last_step_to: str = "x0",
              original_steps: int = 50) -> Grid:
    """The grid of `num_steps` steps (module docstring); a setting that would do nothing is an error."""
    if isinstance(num_steps, jax.core.Tracer):
        raise UsageError("a traced num_steps needs max_steps, the grid's bound: pass max_steps=N (N >= any "
                         "num_steps you will give)")
    K = check_num_steps(num_steps, process.max_steps)
    if spacing == "logsnr":  # dpm_solver++'s name for the log-SNR grid
        sigmas, spacing = "logsnr", "linspace"
    if rho != 7.0 and sigmas != "karras":
        raise UsageError(f"rho shapes the Karras grid: it needs sigmas='karras' (got sigmas={sigmas!r})")
    with jax.ensure_compile_time_eval():
        t = _times(process, K, sigmas, spacing, steps_offset, points, rho, timesteps, original_steps)
        alpha, sigma = (np.asarray(a, np.float64) for a in process.marginal(t))
        if np.any(~np.isfinite(alpha)) or np.any(t[:-1] <= t[1:]):
            shown = np.round(t, 4).tolist()
            raise UsageError(f"the grid's times {shown[:4] + ['...'] + shown[-2:] if len(shown) > 6 else shown} must "
                             f"decrease within the process's range (num_steps {K}, sigmas {sigmas!r}; "
                             f"{'the times given' if timesteps is not None else 'a spacing or offset'} leaves it)")
        model_t = np.asarray(process.model_time(t), np.float64)
        end = np.float64(0.0) if last_step_to == "t0" else np.nan
        if last_step_to == "t0":
            if process.max_steps is None:
                raise UsageError(f"last_step_to='t0' ends at the model's least noisy timestep: the {process.name!r} "
                                 "process has none; its chains end at the clean data")
            ends = (*(np.asarray(a, np.float64) for a in process.marginal(end)), process.model_time(end))
        else:
            ends = (1.0, 0.0, 0.0)
    if sigmas in ("karras", "exponential"):  # the levels they name: an infinite sigma / alpha held at 2^12
        alpha = np.where(alpha > 0, alpha, sigma * np.sqrt(MIN_ABAR))
    t, alpha, sigma, model_t = (np.append(a, e) for a, e in zip((t, alpha, sigma, model_t), (end, *ends)))
    var = sigma[:-1] ** 2 - (alpha[:-1] / alpha[1:]) ** 2 * sigma[1:] ** 2
    return Grid(*(np.asarray(a, np.float32) for a in (t, alpha, sigma, model_t, np.maximum(var, 0.0))))


class GridTable(NamedTuple):
    """The grids of 1 .. bound steps, each padded to bound steps: [bound, bound + 1] arrays (`var`
    [bound, bound]) and `steps` [bound], the steps of each (a "logsnr" grid may have fewer)."""

    grids: Grid
    steps: np.ndarray


def grid_table(process, bound: int, **options) -> GridTable:
    rows, steps = [], []
    for k in range(1, bound + 1):
        grid = make_grid(process, k, **options)
        pad = bound - grid.num_steps
        rows.append(Grid(*(np.pad(a, (0, pad), mode="edge") for a in grid)))
        steps.append(grid.num_steps)
    return GridTable(Grid(*(np.stack(column) for column in zip(*rows))), np.asarray(steps, np.int32))
