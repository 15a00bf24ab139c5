"""Noise schedules of the forward process q(x_t | x_0).

A `Schedule` is a NamedTuple of 1-D float32 arrays of length T (so a pytree that passes
through `jit`, `vmap` and `scan` as an ordinary argument). Every table is computed in float64
NumPy from the betas and only then stored as float32 (DDPM's precision, without its class).

Timesteps are 0-indexed integers t in [0, T): `alphas_cumprod[t]` is abar_t, the fraction of
signal variance left after step t, and `alphas_cumprod_prev[0] == 1`.

`timesteps[i]` maps index i of this schedule to the timestep the model was trained with: the
identity for a fresh schedule, a subsequence for a respaced one (see `respace`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import jax.numpy as jnp

from diffusion_jax.errors import UsageError

SCHEDULE_NAMES = ("linear", "cosine", "sigmoid", "scaled_linear")


class Schedule(NamedTuple):
    """Float32 tables of a T-step diffusion schedule; every field has shape [T]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    timesteps: jnp.ndarray  # int32 [T]: model timestep of each index

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def gather(table: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """table[t], NaN wherever t lies outside [0, T) -- negative t included, which plain
    indexing (and take's fill mode) would wrap around to the end of the table."""
    t = jnp.asarray(t)
    outside = (t < 0) | (t >= table.shape[0])
    return jnp.take(table, jnp.where(outside, table.shape[0], t), axis=0, mode="fill", fill_value=jnp.nan)


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The float64 tables of DDPM / improved DDPM from float64 betas [T]."""
    betas = np.asarray(betas, dtype=np.float64)
    with np.errstate(divide="ignore"):  # beta = 1 (zero terminal SNR) gives infinite 1 / abar
        return _tables(betas)


def _tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t).
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta_tilde_0 = 0: the log is clipped to beta_tilde_1 (DDPM / improved DDPM).
    second = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(second, posterior_variance[1:]))
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def schedule_from_betas(betas, timesteps=None) -> Schedule:
    """A `Schedule` from betas [T] in (0, 1]; `timesteps` [T] defaults to arange(T)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise UsageError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise UsageError("betas must lie in (0, 1]; got values outside that range")
    if timesteps is None:
        timesteps = np.arange(len(betas))
    timesteps = np.asarray(timesteps)
    if timesteps.shape != betas.shape:
        raise UsageError(f"timesteps shape {timesteps.shape} must equal betas shape {betas.shape}")
    tables = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in schedule_tables(betas).items()}
    return Schedule(**tables, timesteps=jnp.asarray(timesteps, dtype=jnp.int32))


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas, rescaled by 1000 / T as improved-diffusion does for other T."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: abar(u) = cos((u + s) / (1 + s) * pi / 2)^2."""

    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
        dtype=np.float64,
    )


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> np.ndarray:
    """Sigmoid schedule (Jabri et al. 2022): abar follows a shifted, rescaled sigmoid."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    u = np.linspace(0.0, 1.0, num_timesteps + 1, dtype=np.float64)
    v_start, v_end = sig(start / tau), sig(end / tau)
    abar = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
    abar = abar / abar[0]
    return np.clip(1.0 - abar[1:] / abar[:-1], 1e-12, max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Latent diffusion's (Stable Diffusion's) betas: linear in sqrt(beta), not rescaled with T."""
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


_BETAS = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas,
          "scaled_linear": scaled_linear_betas}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose abar_T is 0 (Lin et al. 2023, Algorithm 1), in float64.

    sqrt(abar) is shifted so its last value is 0 and scaled so its first is unchanged; the
    model then sees pure noise at t = T, which only v (or x0) prediction can denoise.
    """
    root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = root[0], root[-1]
    abar = ((root - last) * first / (first - last)) ** 2
    return 1.0 - np.append(abar[0], abar[1:] / abar[:-1])


def make_schedule(name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False,
                  **kwargs) -> Schedule:
    """The named schedule (one of SCHEDULE_NAMES) with T = num_timesteps steps,
    rescaled to zero terminal SNR when asked (see `rescale_zero_terminal_snr`).

    Keyword arguments go to the beta function (e.g. `beta_start`, `s`, `tau`).
    """
    if name not in _BETAS:
        raise UsageError(f"unknown schedule name {name!r}; choose one of {SCHEDULE_NAMES}")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise UsageError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    betas = _BETAS[name](int(num_timesteps), **kwargs)
    return schedule_from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)


SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """`num_steps` indices in [0, T), ascending, chosen as diffusers' `timestep_spacing` does
    (Lin et al. 2023, Table 2): "linspace" rounds linspace(0, T - 1, n) (first 0, last T - 1),
    "leading" takes multiples of T // n from 0, "trailing" counts down from T - 1 in steps of
    T / n (so the noisiest step is always t = T - 1)."""
    T, n = num_timesteps, num_steps
    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if not 1 <= n <= T:
        raise UsageError(f"num_steps must be in [1, {T}], got {n}")
    if spacing == "linspace":
        return evenly_spaced_timesteps(T, n)
    if spacing == "leading":
        return np.arange(n, dtype=np.int64) * (T // n)
    return (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[::-1].copy()


def evenly_spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` indices in [0, T) from 0 to T-1, evenly spaced and rounded (sorted, unique)."""
    if not 1 <= num_steps <= num_timesteps:
        raise UsageError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


def respace(schedule: Schedule, timesteps: int | Sequence[int]) -> Schedule:
    """The schedule of a subsequence of timesteps (improved-diffusion's respacing).

    `timesteps` is a count (evenly spaced, see `evenly_spaced_timesteps`) or the indices to keep.
    The new betas are 1 - abar[t_i] / abar[t_{i-1}], so abar is unchanged at the kept steps and
    the forward marginals q(x_t | x_0) agree. `timesteps` of the result maps back to the model
    timesteps of the original schedule (respacing twice composes).
    """
    T = schedule.num_timesteps
    if isinstance(timesteps, (int, np.integer)):
        keep = evenly_spaced_timesteps(T, int(timesteps))
    else:
        keep = np.asarray(sorted(set(int(i) for i in timesteps)), dtype=np.int64)
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= T:
            raise UsageError(f"timesteps must be a non-empty subset of [0, {T}), got {list(keep)}")
    # Recompute abar in float64 from the stored betas (more exact than the float32 abar).
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))
    kept = alphas_cumprod[keep]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return schedule_from_betas(betas, np.asarray(schedule.timesteps)[keep])
