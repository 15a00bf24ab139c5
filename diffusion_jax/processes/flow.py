"""Rectified flow / flow matching: x_t = (1 - t) x0 + t eps, t in [0, 1]; the model sees 1000 t
(diffusers' `FlowMatchEulerDiscreteScheduler`, SD3, Flux), and its natural target is the velocity
d x_t / dt = eps - x0. `shift` s moves time towards the noisy end, t' = s t / (1 + (s - 1) t)
(SD3); with `use_dynamic_shifting` the shift is diffusers' exponential time shift by `mu`,
t' = e^mu / (e^mu + 1 / t - 1) (Flux: mu from the image size between base_shift and max_shift).
The grid is diffusers' `set_timesteps` exactly; the ODE is linear in t itself (`ode_frame` 1)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.registry import ContinuousTime, array_of, check_positive, register


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FlowProcess(ContinuousTime):
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    mu: Optional[float] = None
    num_train_timesteps: int = 1000

    name: ClassVar[str] = "flow"
    prior_std: ClassVar[float] = 1.0
    ode_frame: ClassVar[float] = 1.0

    def __post_init__(self):
        check_positive("flow", shift=self.shift, num_train_timesteps=self.num_train_timesteps)
        if self.mu is not None and not np.isfinite(self.mu):
            raise UsageError(f"process 'flow' option mu = {self.mu!r} must be a finite number")

    def marginal(self, t):
        t = array_of(t)[1]
        return 1.0 - t, t

    def model_time(self, t):
        return float(self.num_train_timesteps) * array_of(t)[1]

    def time_at(self, ve_sigma):
        s = array_of(ve_sigma)[1]
        return s / (1.0 + s)

    def ve_sigma_range(self) -> tuple[float, float]:
        """From t = 1 / T to t = 1, where alpha = 0: the noisy end is infinitely far in sigma / alpha."""
        return 1.0 / (self.num_train_timesteps - 1.0), math.inf

    def shifted(self, t):
        """t (NumPy or JAX) moved by the process's shift (static or, with use_dynamic_shifting, by mu)."""
        if self.use_dynamic_shifting:
            if self.mu is None:
                raise UsageError("process 'flow' has use_dynamic_shifting=True: give mu (diffusers computes it "
                                 "from the image sequence length between base_shift and max_shift)")
            return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / t - 1.0))
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def training_time(self, u):
        """u moved by the shift (diffusers' SD3 training), when there is one."""
        return self.shifted(u) if self.shift != 1.0 or self.use_dynamic_shifting else u

    def spread_time(self, u):
        return u

    def own_grid(self, num_steps: int) -> np.ndarray:
        """diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps) less its final 0: its
        training sigmas k / T (k = T .. 1, float32; statically shifted once at construction), the
        inference times evenly spaced between the first and last of them, shifted."""
        T = int(self.num_train_timesteps)
        train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not self.use_dynamic_shifting:
            train = (np.float32(self.shift) * train / (1 + (np.float32(self.shift) - 1) * train)).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas = np.linspace(sigma_max * T, sigma_min * T, int(num_steps)) / T
        return np.asarray(self.shifted(sigmas), np.float32).astype(np.float64)


register("flow", FlowProcess)
