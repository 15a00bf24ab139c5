"""Schedule tables against the DDPM / improved-DDPM formulas computed here in float64."""
import math

import numpy as np
import pytest

import diffusion_jax as dj


def reference_betas(name, T):
    if name == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


def reference_tables(betas):
    """DDPM (Ho et al. 2020, eqs. 4, 6, 7) written out directly from the betas."""
    T = len(betas)
    a = 1 - betas
    abar = np.array([np.prod(a[: i + 1]) for i in range(T)])
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    return {
        "betas": betas, "alphas": a, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar ** 0.5, "sqrt_one_minus_alphas_cumprod": (1 - abar) ** 0.5,
        "log_one_minus_alphas_cumprod": np.log(1 - abar),
        "sqrt_recip_alphas_cumprod": abar ** -0.5, "sqrt_recipm1_alphas_cumprod": (1 / abar - 1) ** 0.5,
        "posterior_variance": beta_tilde,
        "posterior_log_variance_clipped": np.log(np.concatenate([[beta_tilde[1]], beta_tilde[1:]])),
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1 - abar),
        "posterior_mean_coef2": np.sqrt(a) * (1 - abar_prev) / (1 - abar),
    }


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50])
def test_tables_match_float64_reference(name, T):
    s = dj.make_schedule(name, T)
    ref = reference_tables(reference_betas(name, T))
    assert set(ref) | {"timesteps"} == set(s._fields)
    for field, expected in ref.items():
        got = np.asarray(getattr(s, field), np.float64)
        assert got.dtype == np.float64 and getattr(s, field).dtype == np.float32
        rel = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-300)
        assert rel.max() <= 1e-6, (field, rel.max())
    np.testing.assert_array_equal(np.asarray(s.timesteps), np.arange(T))


def test_linear_endpoints_and_cosine_cap():
    s = dj.make_schedule("linear", 1000)
    assert abs(float(s.betas[0]) - 1e-4) < 1e-10 and abs(float(s.betas[-1]) - 0.02) < 1e-9
    c = dj.make_schedule("cosine", 1000)
    assert float(c.betas.max()) == pytest.approx(0.999, abs=1e-7)


def test_sigmoid_is_a_valid_schedule():
    s = dj.make_schedule("sigmoid", 200)
    abar = np.asarray(s.alphas_cumprod)
    assert np.all(np.diff(abar) < 0) and 0.9 < abar[0] < 1 and abar[-1] < 1e-2


def test_from_betas_and_pytree():
    import jax
    betas = np.linspace(1e-3, 0.05, 20)
    s = dj.schedule_from_betas(betas)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 14
    # A schedule passes through jit as an ordinary argument.
    out = jax.jit(lambda sch: sch.alphas_cumprod[-1])(s)
    assert float(out) == pytest.approx(np.prod(1 - betas), rel=1e-6)


def test_respace_keeps_marginals_and_maps_timesteps():
    s = dj.make_schedule("linear", 1000)
    r = dj.respace(s, 50)
    keep = dj.evenly_spaced_timesteps(1000, 50)
    assert r.num_timesteps == 50 and keep[0] == 0 and keep[-1] == 999
    np.testing.assert_array_equal(np.asarray(r.timesteps), keep)
    abar = np.cumprod(1 - np.asarray(s.betas, np.float64))
    np.testing.assert_allclose(np.asarray(r.alphas_cumprod), abar[keep], rtol=1e-6)
    # Respacing a respaced schedule composes back to the original indices.
    rr = dj.respace(r, [0, 10, 49])
    np.testing.assert_array_equal(np.asarray(rr.timesteps), keep[[0, 10, 49]])
    np.testing.assert_allclose(np.asarray(rr.alphas_cumprod), abar[keep[[0, 10, 49]]], rtol=1e-6)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="unknown schedule name 'quadratic'"):
        dj.make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        dj.make_schedule("linear", 0)
    with pytest.raises(ValueError, match="betas"):
        dj.schedule_from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="timesteps"):
        dj.respace(dj.make_schedule("linear", 100), [3, 100])
