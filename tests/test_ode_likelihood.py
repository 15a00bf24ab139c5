"""The probability-flow ODE likelihood of vp, edm and flow on Gaussian data with the exact model:
per example, the closed-form -log N(x; mu, s^2) in bits per dimension, within 0.01."""
import math

import jax
import numpy as np
import pytest

from diffusion_jax.errors import UsageError
from diffusion_jax.ode_likelihood import ode_nll_bpd
from diffusion_jax.processes import make_process
from tests.oracles import gaussian_exact_process_model
import diffusion_jax as dj

MU, S = 0.3, 0.5


@pytest.mark.parametrize("name,prediction", [("vp", "eps"), ("edm", "x0"), ("flow", "velocity")])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_the_ode_likelihood_of_gaussian_data_is_its_closed_form(name, prediction, divergence):
    process = make_process(name)
    x = MU + S * np.random.default_rng(0).standard_normal((256, 2, 2, 1)).astype(np.float32)
    bpd = np.asarray(ode_nll_bpd(gaussian_exact_process_model(process, prediction, MU, S), process, x, jax.random.key(1),
                                 prediction=prediction, num_steps=64, divergence=divergence, dequantize=False))
    nats = 0.5 * math.log(2 * math.pi * S ** 2) + (x.reshape(256, -1).astype(np.float64) - MU) ** 2 / (2 * S ** 2)
    truth = nats.mean(axis=1) / math.log(2)
    if divergence == "exact":
        np.testing.assert_allclose(bpd, truth, atol=0.01)
    else:  # the probe's noise is unbiased: the mean over examples agrees
        assert abs(bpd.mean() - truth.mean()) < 0.01 + 4 * (bpd - truth).std() / np.sqrt(len(bpd))


def test_dequantised_bits_per_dim_add_the_offset_and_what_is_refused():
    process = make_process("flow")
    model = gaussian_exact_process_model(process, "velocity", MU, S)
    x = np.clip(MU + S * np.random.default_rng(2).standard_normal((64, 2, 2, 1)), -1, 1).astype(np.float32)
    continuous = np.asarray(ode_nll_bpd(model, process, x, jax.random.key(0), prediction="velocity", num_steps=32,
                                        dequantize=False))
    discrete = np.asarray(ode_nll_bpd(model, process, x, jax.random.key(0), prediction="velocity", num_steps=32))
    assert abs(discrete.mean() - continuous.mean() - 7.0) < 0.05  # uniform noise of 1/128 moves x little
    with pytest.raises(UsageError, match="give a key"):
        ode_nll_bpd(model, process, x, prediction="velocity")


@pytest.mark.parametrize("schedule,prediction", [("linear", "eps"), ("cosine", "v")])
def test_a_ddpm_model_has_the_likelihood_of_its_continuous_time_view(schedule, prediction):
    """A DDPM schedule in continuous time (log-SNR linear between its steps, fractional indices):
    the exact model of Gaussian data there has the closed-form likelihood of x at the first noise
    level, N(x; alpha_0 mu, alpha_0^2 s^2 + sigma_0^2), within 0.01 bits/dim."""
    import jax.numpy as jnp

    ddpm = dj.make_schedule(schedule, 1000)
    view = dj.make_process("ddpm", schedule=schedule)
    a0, s0 = (float(v) for v in view.marginal(jnp.float32(0.0)))
    abar = np.asarray(ddpm.alphas_cumprod, np.float64)
    np.testing.assert_allclose([a0 ** 2, float(view.marginal(jnp.float32(999.0))[0]) ** 2],
                               [abar[0], max(abar[-1], 2.0 ** -24)], rtol=1e-5)  # abar held at 2^-24 at least
    np.testing.assert_allclose(float(view.model_time(jnp.float32(499.5))), 499.5, rtol=1e-6)
    model = gaussian_exact_process_model(view, prediction, MU, S)
    x = MU + S * np.random.default_rng(3).standard_normal((128, 2, 2, 1)).astype(np.float32)
    bpd = np.asarray(ode_nll_bpd(model, ddpm, x, jax.random.key(1), prediction=prediction, num_steps=64,
                                 dequantize=False))
    var = a0 ** 2 * S ** 2 + s0 ** 2
    nats = 0.5 * np.log(2 * np.pi * var) + (x.reshape(128, -1).astype(np.float64) - a0 * MU) ** 2 / (2 * var)
    np.testing.assert_allclose(bpd, nats.mean(axis=1) / math.log(2), atol=0.01)
