"""UniPC (Zhao et al. 2023) as diffusers' `UniPCMultistepScheduler` runs it: order 2, B(h) = e^-h - 1
("bh2"), data prediction, the corrector UniC at every step but the first, first order at the first
and the last step.

In lambda = log(alpha / sigma), with x0 estimates m_i at the levels i, h = lambda' - lambda and
r = exp(-h), the predictor UniP from level i to i + 1 is
    x_{i+1} = (sigma' / sigma) x_i + alpha' (1 - r) m_i + alpha' (1 - r) (m_{i-1} - m_i) / (2 rk),
rk = (lambda_{i-1} - lambda_i) / h (its second-order term dropped at a first-order step). Once the
model has given m_{i+1} at the predicted x_{i+1}, the corrector replaces x_{i+1} by the same step
from x_i with m_{i+1} added: x_{i+1} = (sigma' / sigma) x_i + alpha' (1 - r) m_i - alpha' B
(rho_0 D_1 + rho_1 (m_{i+1} - m_i)), B = r - 1, D_1 = (m_{i-1} - m_i) / rk, where (rho_0, rho_1) solve
[[1, 1], [rk, 1]] rho = (b_1, b_2), b_1 = (B / -h - 1) / B, b_2 = 2 ((B / -h - 1) / -h - 1/2) / B (only
rho_1 = 1/2 after a first-order step). The model's m_{i+1} is kept for the next step, as diffusers
keeps it (computed before the correction).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers.methods import denoise_at
from diffusion_jax.samplers.registry import Sampler, register


def unipc_init(x):
    zeros = jnp.zeros(x.shape, jnp.float32)
    return {"x": zeros, "m": zeros, "m_prev": zeros, "lam": jnp.zeros(3, jnp.float32),
            "sigma": jnp.ones((), jnp.float32), "order": jnp.ones((), jnp.int32)}


def _update(x, m0, sigma, sigma_next, alpha_next, h):
    """The first-order part, (sigma' / sigma) x + alpha' (1 - r) m0, and B = r - 1."""
    b = jnp.expm1(-h)
    return sigma_next / sigma * x - alpha_next * b * m0, b


def unipc_step(ctx, x, state, lv, key):
    lam = jnp.log(lv.alpha) - jnp.log(lv.sigma)
    m = denoise_at(ctx, x, lv)[0]
    # the corrector of the previous step's prediction x (state: its start x_i, m_i, m_{i-1}, lambdas)
    lam_i, lam_prev = state["lam"][1], state["lam"][2]
    h = lam - lam_i
    base, b = _update(state["x"], state["m"], state["sigma"], lv.sigma, lv.alpha, h)
    hh = -h
    b1 = (b / hh - 1.0) / b
    b2 = 2.0 * ((b / hh - 1.0) / hh - 0.5) / b
    rk = (lam_prev - lam_i) / h
    rho_0 = (b1 - b2) / (1.0 - rk)  # [[1, 1], [rk, 1]] rho = (b1, b2)
    rho_1 = b1 - rho_0
    second = state["order"] == 2
    d1 = (state["m_prev"] - state["m"]) / rk
    correction = jnp.where(second, rho_0 * d1 + rho_1 * (m - state["m"]), 0.5 * (m - state["m"]))
    x = jnp.where(lv.i > 0, base - lv.alpha * b * correction, x)
    # the predictor to the next level, of order 2 except at the first and the last step
    order = jnp.where((lv.i == 0) | (lv.i == ctx.num_steps - 1), 1, 2)
    lam_next = jnp.log(lv.alpha_next) - jnp.log(lv.sigma_next)
    h = lam_next - lam
    x_next, b = _update(x, m, lv.sigma, lv.sigma_next, lv.alpha_next, h)
    rk = (state["lam"][1] - lam) / h
    second_order = -lv.alpha_next * b * 0.5 * (state["m"] - m) / rk
    x_next = jnp.where(order == 2, x_next + second_order, x_next)
    return x_next, {"x": x, "m": m, "m_prev": state["m"], "lam": jnp.stack([lam_next, lam, state["lam"][1]]),
                    "sigma": lv.sigma, "order": order}, m


register(Sampler("unipc", unipc_step, 20, {}, {"sigmas": "logsnr"}, init_state=unipc_init))
