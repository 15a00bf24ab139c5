"""EDM (Karras et al. 2022): x = x0 + sigma eps, the time t is sigma itself (alpha = 1), from
sigma_max = 80 down to 0; the model sees sigma (its preconditioning, c_noise = ln(sigma) / 4, is
the model wrapper's: `sigma_data` is kept here for it). The grid is EDM's: rho = 7 steps from
sigma_max to sigma_min, then 0 (NVlabs/edm's `edm_sampler`)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.processes.registry import ContinuousTime, array_of, check_positive, register


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EDMProcess(ContinuousTime):
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0

    name: ClassVar[str] = "edm"

    def __post_init__(self):
        check_positive("edm", sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                       rho=self.rho)
        if self.sigma_min >= self.sigma_max:
            raise UsageError(f"process 'edm': sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")

    @property
    def prior_std(self) -> float:
        return float(self.sigma_max)

    def marginal(self, t):
        xp, sigma = array_of(t)
        return xp.ones_like(sigma), sigma

    def model_time(self, t):
        return array_of(t)[1]

    def time_at(self, ve_sigma):
        return array_of(ve_sigma)[1]

    def ve_sigma_range(self) -> tuple[float, float]:
        return float(self.sigma_min), float(self.sigma_max)

    def training_time(self, u):
        """sigma uniform on [sigma_min, sigma_max] (EDM trains with `lognormal` instead)."""
        return self.sigma_min + u * (self.sigma_max - self.sigma_min)

    def spread_time(self, u):
        """sigma log-uniform on [sigma_min, sigma_max]."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def near_clean(self, first: float) -> float:
        return first * 1e-2

    def own_grid(self, num_steps: int) -> np.ndarray:
        """EDM eq. 5 in float64: sigma_i = (sigma_max^(1/rho) + i / (K - 1) (sigma_min^(1/rho) -
        sigma_max^(1/rho)))^rho for i < K (the clean end, 0, follows)."""
        return karras_sigmas(self.sigma_min, self.sigma_max, int(num_steps), self.rho)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho) (EDM eq. 5), float64."""
    ramp = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def precondition(backbone_fn, sigma_data: float = 0.5):
    """EDM's preconditioning (Karras et al. 2022, Table 1) around any backbone: the denoiser
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), an "x0" predictor of the "edm" process, with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sd = sigma_data).

    backbone_fn(x_in [B, ...], c_noise [B], *cond) -> F [B, ...] (a U-Net's or DiT's apply); the
    result is denoise_fn(x [B, ...], sigma [B], *cond) -> D [B, ...] in float32.
    """
    def denoise(x, sigma, *cond):
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32)
        s = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
        total = s * s + sigma_data * sigma_data
        c_skip, c_out, c_in = sigma_data ** 2 / total, s * sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total)
        out = backbone_fn(c_in * x, jnp.log(sigma) / 4.0, *cond)
        return c_skip * x + c_out * jnp.asarray(out, jnp.float32)

    return denoise


register("edm", EDMProcess)
