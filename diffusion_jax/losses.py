"""The training objective for any process: the denoising loss with its time samplings and
weightings, plus improved DDPM's hybrid term where the process has a discrete posterior. It
sits above `diffusion` and `likelihood` (the variational bound) and `processes`, so none of
those imports the others' users.

Times come from `time_sampling` ("uniform": the process's own, DDPM's t ~ U{0..T-1};
"logit_normal", SD3's; "lognormal", EDM's noise level sigma / alpha; "mode", SD3's), and every
weighting is a weight w(t) on the x0-MSE carried to the prediction's MSE: at a fixed x_t,
pred-MSE = c_pred(t)^2 x0-MSE with c_eps^2 = SNR = alpha^2 / sigma^2, c_x0 = 1,
c_v^2 = (alpha^2 + sigma^2)^2 / sigma^2, c_velocity^2 = (alpha' - sigma' alpha / sigma)^2.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import draws
from diffusion_jax.diffusion import VARIANCES, _check_option, mean_flat, split_model_output
from diffusion_jax.errors import UsageError
from diffusion_jax.likelihood import discrete_schedule, vlb_terms_bpd
from diffusion_jax.processes import as_process
from diffusion_jax.processes.targets import check_prediction, levels, prediction_target
from diffusion_jax.processes.times import TIME_SAMPLINGS, sample_times  # noqa: F401 (re-exported)

WEIGHTINGS = ("none", "min_snr", "p2", "edm", "sigma_sqrt", "cosmap")
def mse_factor(lv, prediction: str):
    """c_pred(t)^2 [B]: the prediction's MSE per unit of x0-MSE at a fixed x_t (module docstring)."""
    if prediction == "velocity":
        return (lv.d_alpha - lv.d_sigma * lv.alpha / lv.sigma) ** 2
    return {"eps": lv.alpha ** 2 / lv.sigma ** 2, "x0": jnp.ones_like(lv.alpha),
            "v": (lv.alpha ** 2 + lv.sigma ** 2) ** 2 / lv.sigma ** 2}[prediction]


def loss_weight(process, lv, prediction: str, weighting: str, *, min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0):
    """Per-example weight [B] on the MSE of `prediction` at levels `lv` ([B] each).

    none: 1. min_snr (Hang et al. 2023): min(SNR, gamma) on the x0-MSE; p2 (Choi et al. 2022):
    SNR / (k + SNR)^gamma on the x0-MSE (1 / (k + SNR)^gamma on the eps-MSE), SNR = alpha^2 /
    sigma^2. edm: EDM's lambda = (s^2 + sigma_data^2) / (s sigma_data)^2 on the x0-MSE, s = sigma /
    alpha (a process with sigma_data). sigma_sqrt (sigma^-2) and cosmap (2 / (pi (1 - 2 sigma +
    2 sigma^2))): SD3's weights, as diffusers applies them to the prediction's MSE.
    """
    _check_option("weighting", weighting, WEIGHTINGS)
    alpha, sigma = lv.alpha, lv.sigma
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
        data = getattr(process, "sigma_data", None)
        if data is None:
            raise UsageError(f"weighting 'edm' is EDM's lambda(sigma), which needs the data's sigma_data: the "
                             f"{process.name!r} process has none (use process 'edm')")
        s = sigma / alpha
        on_x0 = (s ** 2 + data ** 2) / (s * data) ** 2
    return on_x0 / mse_factor(lv, prediction)


def training_loss(denoise_fn: Callable, process, x0, key, *, prediction: str = "eps", weighting: str = "none",
                  variance: str = "fixed_small", vlb_weight: float = 0.001, min_snr_gamma: float = 5.0,
                  p2_gamma: float = 1.0, p2_k: float = 1.0, time_sampling: str = "uniform",
                  time_sampling_options=None, objective: str = "denoise", objective_options=None,
                  unconditional=None):
    """The denoising loss on a batch x0 [B, ...] of any process (a DDPM `Schedule` too): times from
    `time_sampling`, fresh noise, x_t = alpha x0 + sigma eps, the model `denoise_fn(x_t, model
    time)` regressed on `prediction`'s target with `loss_weight`.

    x_t reaches the model in float32 whatever x0's dtype (a bfloat16 model casts its input
    itself). Returns (loss, aux): the float32 batch mean and per-example arrays [B]: "t", "mse"
    (unweighted), "loss". With `variance="learned_range"` the loss is improved DDPM's hybrid
    L_simple + vlb_weight * T * L_t (L_t in bits/dim; a process with a discrete posterior, DDPM's),
    the VLB term seeing the mean output through a stop-gradient so it trains only the variance;
    aux then also has "vlb". Another `objective` (`objectives.OBJECTIVES`: "meanflow", "consistency")
    is that objective's loss with `objective_options`, `denoise_fn` its model (meanflow's takes r=);
    `unconditional` (`objectives.meanflow.Unconditional`) is for those of `objectives.GUIDED`.
    """
    if objective != "denoise":
        from diffusion_jax.objectives import GUIDED, OBJECTIVES, objective_options as checked

        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {objective!r}; choose one of {('denoise',) + tuple(OBJECTIVES)}")
        options = checked(objective, dict(objective_options or {}))
        if objective in GUIDED:
            options["unconditional"] = unconditional
        return OBJECTIVES[objective](denoise_fn, process, x0, key, prediction=prediction, **options)
    process = as_process(process)
    check_prediction(prediction)
    _check_option("variance", variance, VARIANCES)
    if variance == "learned_range" and discrete_schedule(process) is None:
        raise UsageError(f"variance 'learned_range' trains with the variational bound of a discrete posterior: the "
                         f"{process.name!r} process has none; use variance='fixed_small'")
    key_t, key_noise = jax.random.split(key)
    t = sample_times(process, key_t, x0.shape[0], time_sampling, **dict(time_sampling_options or {}))
    noise = draws.normal(key_noise, x0.shape)
    x0 = x0.astype(jnp.float32)
    lv = levels(process, t, x0, derivatives=prediction == "velocity")
    x_t = lv.alpha * x0 + lv.sigma * noise
    mean_out, var_out = split_model_output(denoise_fn(x_t, process.model_time(t)), x_t, variance)
    mse = mean_flat((mean_out.astype(jnp.float32) - prediction_target(prediction, lv, x0, noise)) ** 2)
    flat = lv._replace(**{k: v.reshape(-1) for k, v in lv._asdict().items() if v is not None})
    per_example = loss_weight(process, flat, prediction, weighting, min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma,
                              p2_k=p2_k) * mse
    aux = {"t": t, "mse": mse}
    if variance == "learned_range":
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out.astype(jnp.float32)), var_out.astype(jnp.float32)], -1)
        vlb, _ = vlb_terms_bpd(discrete_schedule(process), frozen, x0, x_t, t, prediction=prediction, variance=variance)
        aux["vlb"] = vlb
        per_example = per_example + vlb_weight * process.max_steps * vlb
    aux["loss"] = per_example
    return jnp.mean(per_example), aux


__all__ = ["TIME_SAMPLINGS", "WEIGHTINGS", "loss_weight", "mse_factor", "sample_times", "training_loss"]
