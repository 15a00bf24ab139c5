"""Continuous-time variance-preserving diffusion (score_sde's VP SDE): t in [0, 1],
alpha(t)^2 + sigma(t)^2 = 1, with score_sde's linear beta(t) = beta_min + t (beta_max - beta_min)
(log alpha = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2) or improved DDPM's cosine alpha-bar
(alpha = cos(pi/2 (t + s) / (1 + s)) / cos(pi/2 s / (1 + s))). The model sees 999 t (score_sde's
input for networks of discrete-time shape)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.registry import ContinuousTime, array_of, check_positive, register

VP_SCHEDULES = ("linear", "cosine")
T_MIN = 1e-3  # the least noisy time of the sigma grids (score_sde's sampling eps)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPProcess(ContinuousTime):
    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008

    name: ClassVar[str] = "vp"
    prior_std: ClassVar[float] = 1.0

    def __post_init__(self):
        if self.schedule not in VP_SCHEDULES:
            raise UsageError(f"process 'vp' option schedule = {self.schedule!r}: choose one of {VP_SCHEDULES}")
        check_positive("vp", beta_min=self.beta_min, beta_max=self.beta_max, cosine_s=self.cosine_s)

    def _cosine_end(self) -> float:
        return math.cos(0.5 * math.pi * self.cosine_s / (1.0 + self.cosine_s))

    def marginal(self, t):
        xp, t = array_of(t)
        if self.schedule == "linear":
            log_alpha = -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
            return xp.exp(log_alpha), xp.sqrt(-xp.expm1(2.0 * log_alpha))
        s = self.cosine_s
        alpha = xp.clip(xp.cos(0.5 * math.pi * (t + s) / (1.0 + s)) / self._cosine_end(), 0.0, 1.0)
        return alpha, xp.sqrt(xp.maximum(1.0 - alpha * alpha, 0.0))

    def model_time(self, t):
        return 999.0 * array_of(t)[1]

    def time_at(self, ve_sigma):
        """The t with sigma / alpha = ve_sigma: log alpha = -log(1 + s^2) / 2 solved for t."""
        xp, s = array_of(ve_sigma)
        log_alpha = -0.5 * xp.log1p(s * s)
        if self.schedule == "linear":
            a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
            return (xp.sqrt(b * b - 4.0 * a * log_alpha) - b) / (2.0 * a)
        arc = xp.arccos(xp.exp(log_alpha) * self._cosine_end())
        return arc * (1.0 + self.cosine_s) / (0.5 * math.pi) - self.cosine_s

    def ve_sigma_range(self) -> tuple[float, float]:
        (a0, a1), (s0, s1) = self.marginal(np.array([T_MIN, 1.0]))
        return float(s0 / a0), float(s1 / a1)

    def own_grid(self, num_steps: int) -> np.ndarray:
        """num_steps times evenly spaced from 1 down to 1 / num_steps."""
        return np.linspace(1.0, 0.0, int(num_steps) + 1)[:-1]


register("vp", VPProcess)
