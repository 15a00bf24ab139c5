"""The training objective: the denoising loss with its weightings and improved DDPM's hybrid
loss, for DDPM's discrete schedule and for every continuous-time process (vp, edm, flow). It
sits above `diffusion` (the forward process and the posterior), `likelihood` (the variational
bound) and `processes`, so none of those imports the others' users.

For a `Schedule` (DDPM) `training_loss` is what it always was, bitwise. For a continuous process
the times come from `time_sampling` ("uniform"; "logit_normal", SD3's; "lognormal", EDM's sigma;
"mode", SD3's) and every weighting is a weight w(t) on the x0-MSE carried to the prediction's MSE:
at a fixed x_t, pred-MSE = c_pred(t)^2 x0-MSE with c_eps^2 = SNR = alpha^2 / sigma^2,
c_x0 = 1, c_v^2 = (alpha^2 + sigma^2)^2 / sigma^2, c_velocity^2 = (alpha' - sigma' alpha / sigma)^2.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import (PREDICTIONS, _check_option, gather, mean_flat, q_sample,
                                     split_model_output, v_from_x0_eps)
from diffusion_jax.errors import UsageError
from diffusion_jax.likelihood import vlb_terms_bpd
from diffusion_jax.processes import prediction_target
from diffusion_jax.processes import targets as process_targets
from diffusion_jax.processes.ddpm import ddpm_schedule
from diffusion_jax.schedules import Schedule

WEIGHTINGS = ("none", "min_snr", "p2")


def snr(s: Schedule, t):
    """Signal-to-noise ratio abar_t / (1 - abar_t) at indices t."""
    return gather(s.alphas_cumprod / (1.0 - s.alphas_cumprod), t)


def loss_weight(s: Schedule, t, prediction: str, weighting: str, *, min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0):
    """Per-example weight [B] on the MSE of the chosen prediction target.

    min_snr (Hang et al. 2023): min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
    min(SNR, gamma) / (SNR + 1) for v. p2 (Choi et al. 2022): 1 / (k + SNR)^gamma on the
    eps-MSE, carried to x0 / v through eps-MSE = SNR x0-MSE = SNR / (SNR + 1) v-MSE.
    """
    _check_option("weighting", weighting, WEIGHTINGS)
    r = snr(s, t)
    if weighting == "none":
        return jnp.ones_like(r)
    if weighting == "min_snr":
        clipped = jnp.minimum(r, min_snr_gamma)
        return {"eps": clipped / r, "x0": clipped, "v": clipped / (r + 1.0)}[prediction]
    w_eps = 1.0 / (p2_k + r) ** p2_gamma
    return {"eps": w_eps, "x0": w_eps * r, "v": w_eps * r / (r + 1.0)}[prediction]


def training_loss(denoise_fn: Callable, s, x0, key, *, prediction: str = "eps",
                  weighting: str = "none", variance: str = "fixed_small",
                  vlb_weight: float = 0.001, min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
                  p2_k: float = 1.0, time_sampling: str = "uniform", time_sampling_options=None):
    """The denoising loss on a batch x0 [B, ...] with t ~ U{0..T-1} and fresh noise.

    `s` is a Schedule (DDPM; what follows) or a continuous process (`continuous_loss`, which
    `time_sampling` and its options are for).

    `denoise_fn(x_t, t_model) -> model_output`; x_t reaches it in float32 whatever x0's dtype
    (a bfloat16 model casts its input itself). Returns (loss, aux) where loss is the float32
    batch mean and aux holds per-example arrays [B]: "t", "mse" (unweighted), "loss".
    With `variance="learned_range"` the loss is improved DDPM's hybrid
    L_simple + vlb_weight * T * L_t (L_t in bits/dim), the VLB term seeing the mean output
    through a stop-gradient so it trains only the variance; aux then also has "vlb".
    """
    if ddpm_schedule(s) is None:
        if variance != "fixed_small":
            raise UsageError(f"variance {variance!r} (the learned-variance hybrid loss) is DDPM's: a "
                             f"{s.name!r} process trains a fixed-variance model; use variance='fixed_small'")
        return continuous_loss(denoise_fn, s, x0, key, prediction=prediction, weighting=weighting,
                               time_sampling=time_sampling, time_sampling_options=time_sampling_options,
                               min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k)
    s = ddpm_schedule(s)
    if time_sampling != "uniform":
        raise UsageError(f"time_sampling {time_sampling!r} is for continuous-time processes; DDPM samples "
                         "t ~ U{0..T-1}")
    _check_option("prediction", prediction, PREDICTIONS)
    batch = x0.shape[0]
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, (batch,), 0, s.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(s, x0, t, noise)
    model_output = denoise_fn(x_t, s.timesteps[t])
    mean_out, var_out = split_model_output(model_output, x_t, variance)
    mean_out = mean_out.astype(jnp.float32)
    target = {"eps": noise, "x0": x0, "v": None}[prediction]
    if prediction == "v":
        target = v_from_x0_eps(s, x0, noise, t)
    mse = mean_flat((mean_out - target) ** 2)
    weight = loss_weight(s, t, prediction, weighting, min_snr_gamma=min_snr_gamma,
                         p2_gamma=p2_gamma, p2_k=p2_k)
    per_example = weight * mse
    aux = {"t": t, "mse": mse}
    if variance == "learned_range":
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out.astype(jnp.float32)], -1)
        vlb, _ = vlb_terms_bpd(s, frozen, x0, x_t, t, prediction=prediction, variance=variance,
                               clip_x0=False)
        aux["vlb"] = vlb
        per_example = per_example + vlb_weight * s.num_timesteps * vlb
    aux["loss"] = per_example
    return jnp.mean(per_example), aux


# ---------------------------------------------------------------------------- continuous time
TIME_SAMPLINGS = ("uniform", "logit_normal", "lognormal", "mode")
CONTINUOUS_WEIGHTINGS = WEIGHTINGS + ("edm", "sigma_sqrt", "cosmap")
TIME_SAMPLING_DEFAULTS = {"uniform": {}, "logit_normal": {"mean": 0.0, "std": 1.0},
                          "lognormal": {"p_mean": -1.2, "p_std": 1.2}, "mode": {"scale": 1.29}}
T_MARGIN = 1e-5  # uniform, logit-normal and mode times stay this far inside (0, 1)


def sample_times(process, key, batch: int, time_sampling: str = "uniform", **options):
    """Training times float32 [batch] of a continuous process.

    uniform, logit_normal (t = sigmoid(mean + std z), SD3) and mode (SD3's, `scale`) draw u in
    (0, 1) and map it onto the process's range ("edm": sigma in [sigma_min, sigma_max]); a flow
    process's shift moves them (diffusers' SD3 training). lognormal is EDM's: sigma =
    exp(p_mean + p_std z), for "edm" only.
    """
    _check_option("time_sampling", time_sampling, TIME_SAMPLINGS)
    unknown = set(options) - set(TIME_SAMPLING_DEFAULTS[time_sampling])
    if unknown:
        raise UsageError(f"time_sampling {time_sampling!r} takes {sorted(TIME_SAMPLING_DEFAULTS[time_sampling]) or 'no options'}, "
                         f"not {sorted(unknown)}")
    o = {**TIME_SAMPLING_DEFAULTS[time_sampling], **options}
    if time_sampling == "lognormal":
        if not process.time_is_sigma:
            raise UsageError(f"time_sampling 'lognormal' draws EDM's sigma: use it with process 'edm', not "
                             f"{process.name!r} (logit_normal is its counterpart on [0, 1])")
        return jnp.exp(o["p_mean"] + o["p_std"] * jax.random.normal(key, (batch,), jnp.float32))
    if time_sampling == "uniform":
        u = jax.random.uniform(key, (batch,), jnp.float32)
    elif time_sampling == "logit_normal":
        u = jax.nn.sigmoid(o["mean"] + o["std"] * jax.random.normal(key, (batch,), jnp.float32))
    else:
        v = jax.random.uniform(key, (batch,), jnp.float32)
        u = 1.0 - v - o["scale"] * (jnp.cos(0.5 * jnp.pi * v) ** 2 - 1.0 + v)
    return process.training_time(jnp.clip(u, T_MARGIN, 1.0 - T_MARGIN))


def mse_factor(process, t, prediction: str):
    """c_pred(t)^2 [B]: the prediction's MSE per unit of x0-MSE at a fixed x_t (module docstring)."""
    t1 = jnp.asarray(t)
    if prediction == "velocity":
        alpha, sigma, d_alpha, d_sigma = (c.reshape(-1) for c in
                                          process_targets.coefficients(process, t1, t1, derivatives=True))
        return (d_alpha - d_sigma * alpha / sigma) ** 2
    alpha, sigma = process.marginal(t1)
    return {"eps": alpha ** 2 / sigma ** 2, "x0": jnp.ones_like(alpha),
            "v": (alpha ** 2 + sigma ** 2) ** 2 / sigma ** 2}[prediction]


def continuous_weight(process, t, prediction: str, weighting: str, *, min_snr_gamma: float = 5.0,
                      p2_gamma: float = 1.0, p2_k: float = 1.0):
    """Per-example weight [B] on the MSE of `prediction` at times t of a continuous process.

    none: 1. min_snr, p2: as for DDPM (`loss_weight`), SNR = alpha^2 / sigma^2. edm: EDM's
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0-MSE. sigma_sqrt
    (sigma^-2) and cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2))): SD3's weights, as diffusers
    applies them to the prediction's MSE.
    """
    _check_option("weighting", weighting, CONTINUOUS_WEIGHTINGS)
    alpha, sigma = process.marginal(t)
    if weighting == "none":
        return jnp.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    r = alpha ** 2 / sigma ** 2
    if weighting == "min_snr":
        on_x0 = jnp.minimum(r, min_snr_gamma)
    elif weighting == "p2":
        on_x0 = r / (p2_k + r) ** p2_gamma
    else:
        if not process.time_is_sigma:
            raise UsageError(f"weighting 'edm' is EDM's lambda(sigma): use it with process 'edm', not {process.name!r}")
        on_x0 = (sigma ** 2 + process.sigma_data ** 2) / (sigma * process.sigma_data) ** 2
    return on_x0 / mse_factor(process, t, prediction)


def continuous_loss(denoise_fn: Callable, process, x0, key, *, prediction: str = "eps", weighting: str = "none",
                    time_sampling: str = "uniform", time_sampling_options=None, min_snr_gamma: float = 5.0,
                    p2_gamma: float = 1.0, p2_k: float = 1.0):
    """The denoising loss of a continuous process on a batch x0 [B, ...]: t from `time_sampling`,
    fresh noise, x_t = alpha x0 + sigma eps, the model `denoise_fn(x_t, process.model_time(t))`
    regressed on `prediction_target` with `continuous_weight`. Returns (loss, aux) as
    `training_loss` does (aux: "t", "mse" unweighted, "loss")."""
    key_t, key_noise = jax.random.split(key)
    t = sample_times(process, key_t, x0.shape[0], time_sampling, **dict(time_sampling_options or {}))
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    alpha, sigma = process_targets.coefficients(process, t, x0)
    x_t = alpha * x0 + sigma * noise
    out = denoise_fn(x_t, process.model_time(t)).astype(jnp.float32)
    target = prediction_target(prediction, process, t, x0, noise)
    mse = mean_flat((out - target) ** 2)
    per_example = continuous_weight(process, t, prediction, weighting, min_snr_gamma=min_snr_gamma,
                                    p2_gamma=p2_gamma, p2_k=p2_k) * mse
    return jnp.mean(per_example), {"t": t, "mse": mse, "loss": per_example}


__all__ = ["CONTINUOUS_WEIGHTINGS", "TIME_SAMPLINGS", "continuous_loss", "continuous_weight", "loss_weight",
           "mse_factor", "sample_times", "snr", "training_loss"]
