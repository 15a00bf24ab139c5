"""The training objective: the denoising loss with its weightings and improved DDPM's hybrid
loss. It sits above `diffusion` (the forward process and the posterior) and `likelihood` (the
variational bound), so neither of those imports the other's users.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import (PREDICTIONS, _check_option, gather, mean_flat, q_sample,
                                     split_model_output, v_from_x0_eps)
from diffusion_jax.likelihood import vlb_terms_bpd
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


def training_loss(denoise_fn: Callable, s: Schedule, x0, key, *, prediction: str = "eps",
                  weighting: str = "none", variance: str = "fixed_small",
                  vlb_weight: float = 0.001, min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
                  p2_k: float = 1.0):
    """The denoising loss on a batch x0 [B, ...] with t ~ U{0..T-1} and fresh noise.

    `denoise_fn(x_t, t_model) -> model_output`; x_t reaches it in float32 whatever x0's dtype
    (a bfloat16 model casts its input itself). Returns (loss, aux) where loss is the float32
    batch mean and aux holds per-example arrays [B]: "t", "mse" (unweighted), "loss".
    With `variance="learned_range"` the loss is improved DDPM's hybrid
    L_simple + vlb_weight * T * L_t (L_t in bits/dim), the VLB term seeing the mean output
    through a stop-gradient so it trains only the variance; aux then also has "vlb".
    """
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
