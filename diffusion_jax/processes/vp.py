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
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.registry import check_positive, register

VP_SCHEDULES = ("linear", "cosine")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPProcess:
    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008

    name: ClassVar[str] = "vp"
    prior_std: ClassVar[float] = 1.0
    t_noisy: ClassVar[float] = 1.0
    t_clean: ClassVar[float] = 0.0
    time_is_sigma: ClassVar[bool] = False

    def __post_init__(self):
        if self.schedule not in VP_SCHEDULES:
            raise UsageError(f"process 'vp' option schedule = {self.schedule!r}: choose one of {VP_SCHEDULES}")
        check_positive("vp", beta_min=self.beta_min, beta_max=self.beta_max, cosine_s=self.cosine_s)

    def log_alpha(self, t):
        """log alpha(t), float32 (the linear schedule's in closed form)."""
        t = jnp.asarray(t, jnp.float32)
        if self.schedule == "linear":
            return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return jnp.log(jnp.maximum(self.alpha_cosine(t), 1e-30))

    def alpha_cosine(self, t):
        s = self.cosine_s
        return jnp.maximum(jnp.cos(0.5 * math.pi * (t + s) / (1.0 + s)) / math.cos(0.5 * math.pi * s / (1.0 + s)), 0.0)

    def marginal(self, t):
        t = jnp.asarray(t, jnp.float32)
        if self.schedule == "linear":
            log_alpha = self.log_alpha(t)
            return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
        alpha = jnp.minimum(self.alpha_cosine(t), 1.0)
        return alpha, jnp.sqrt(jnp.maximum(1.0 - alpha * alpha, 0.0))

    def model_time(self, t):
        return 999.0 * jnp.asarray(t, jnp.float32)

    def default_grid(self, num_steps: int) -> np.ndarray:
        """num_steps + 1 times evenly spaced from 1 down to 0."""
        return np.linspace(1.0, 0.0, int(num_steps) + 1)

    def training_time(self, u):
        return u

    spread_time = training_time


register("vp", VPProcess)
