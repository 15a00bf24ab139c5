"""The forward process, the reverse step and the training loss against closed forms and
Monte Carlo moments."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from tests.oracles import gaussian_optimal_eps, gaussian_optimal_loss

S = dj.make_schedule("linear", 1000)
MU, SIGMA = 0.3, 0.5


def test_q_sample_monte_carlo_moments():
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    for t in (0, 250, 999):
        noise = draws.normal(jax.random.key(t), x0.shape)
        x_t = np.asarray(dj.q_sample(S, x0, jnp.full((n,), t), noise), np.float64)
        abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t])
        se_mean = np.sqrt((1 - abar) / n)
        assert abs(x_t.mean() - np.sqrt(abar) * 0.7) < 5 * se_mean + 1e-6
        assert abs(x_t.var() - (1 - abar)) < 5 * (1 - abar) * np.sqrt(2 / n) + 1e-7


def test_q_mean_variance_matches_q_sample_formula():
    x0 = draws.uniform(jax.random.key(0), (3, 4, 4, 2), minval=-1, maxval=1)
    t = jnp.array([0, 500, 999])
    mean, var, log_var = dj.q_mean_variance(S, x0, t)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
    np.testing.assert_allclose(mean, np.sqrt(abar)[:, None, None, None] * x0, rtol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0, 0], 1 - abar, rtol=1e-6)
    np.testing.assert_allclose(log_var[:, 0, 0, 0], np.log1p(-abar), rtol=1e-5)


@pytest.mark.parametrize("t", [1, 100, 999])
def test_posterior_composes_to_the_marginal(t):
    """x_t ~ q(x_t|x0), then x_{t-1} ~ q(x_{t-1}|x_t,x0) must have q(x_{t-1}|x0)'s moments."""
    n, x0_value = 200_000, -0.4
    x0 = jnp.full((n, 1), x0_value)
    k1, k2 = jax.random.split(jax.random.key(t))
    tt = jnp.full((n,), t)
    x_t = dj.q_sample(S, x0, tt, draws.normal(k1, x0.shape))
    mean, var, _ = dj.q_posterior(S, x0, x_t, tt)
    x_prev = np.asarray(mean + jnp.sqrt(var) * draws.normal(k2, x0.shape), np.float64)
    abar_prev = float(np.asarray(S.alphas_cumprod, np.float64)[t - 1])
    assert abs(x_prev.mean() - np.sqrt(abar_prev) * x0_value) < 5 * np.sqrt((1 - abar_prev) / n)
    assert abs(x_prev.var() - (1 - abar_prev)) < 5 * (1 - abar_prev) * np.sqrt(2 / n) + 1e-6


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_predictions_convert_back_to_the_data_and_the_noise(prediction):
    """DDPM's predict_x0_eps is processes.targets' conversion at the schedule's levels."""
    from diffusion_jax.processes.targets import levels, prediction_target

    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = draws.uniform(k1, (5, 4, 4, 3), minval=-1, maxval=1)
    eps = draws.normal(k2, x0.shape)
    t = jnp.array([0, 3, 100, 700, 999])
    x_t = dj.q_sample(S, x0, t, eps)
    out = prediction_target(prediction, levels(dj.as_process(S), t, x0), x0, eps)
    got_x0, got_eps = dj.predict_x0_eps(S, out, x_t, t, prediction)
    rows = slice(None) if prediction != "x0" else slice(1, 4)  # eps from x0 is ill-posed where sigma is tiny
    np.testing.assert_allclose(got_x0[rows], x0[rows], atol=2e-4)
    np.testing.assert_allclose(got_eps[rows], eps[rows], atol=2e-4)


def test_t_zero_never_reads_index_minus_one():
    x = jnp.ones((2, 2, 2, 1))
    t = jnp.array([0, 0])
    out = jnp.zeros_like(x)
    huge = 1e6 * jnp.ones_like(x)
    mv = dj.p_mean_variance(S, out, x, t, clip_x0=False)
    stepped = dj.p_sample_step(S, out, x, t, huge, clip_x0=False)
    np.testing.assert_array_equal(stepped, mv.mean)  # noise masked at t = 0
    # At t = 0 the posterior mean is x0 exactly (coef1 = 1, coef2 = 0), whatever x_t is.
    np.testing.assert_allclose(mv.mean, mv.pred_x0, atol=1e-6)
    # log-variance at t = 0 uses beta tilde_1, never a wrapped-around table entry.
    np.testing.assert_allclose(mv.log_variance, np.log(float(S.posterior_variance[1])), rtol=1e-5)
    # Under jit, t out of range gives NaN instead of a silently clamped table entry.
    bad = jax.jit(dj.q_sample)(S, x, jnp.array([1000, 5]), x)
    assert np.isnan(np.asarray(bad[0])).all() and np.isfinite(np.asarray(bad[1])).all()
    # ...and so does a negative t, which indexing would wrap around to t = 999 (or 1000 - k).
    for negative in (-1, -1000, -1001):
        bad = jax.jit(dj.q_sample)(S, x, jnp.array([negative, 5]), x)
        assert np.isnan(np.asarray(bad[0])).all() and np.isfinite(np.asarray(bad[1])).all(), negative
    assert np.isnan(np.asarray(jax.jit(dj.as_process(S).marginal)(jnp.array([-1])))).all()


def test_variance_choices():
    x = jnp.zeros((3, 2, 2, 1))
    t = jnp.array([0, 1, 500])
    small = dj.p_mean_variance(S, x, x, t, variance="fixed_small").variance[:, 0, 0, 0]
    large = dj.p_mean_variance(S, x, x, t, variance="fixed_large").variance[:, 0, 0, 0]
    beta_tilde, beta = np.asarray(S.posterior_variance), np.asarray(S.betas)
    np.testing.assert_allclose(small, [beta_tilde[1], beta_tilde[1], beta_tilde[500]], rtol=1e-5)
    np.testing.assert_allclose(large, [beta_tilde[1], beta[1], beta[500]], rtol=1e-5)
    # learned_range: v = -1 gives beta tilde, v = +1 gives beta, v = 0 their geometric mean.
    for v, expected in ((-1.0, beta_tilde[500]), (1.0, beta[500]),
                        (0.0, np.sqrt(beta_tilde[500] * beta[500]))):
        out = jnp.concatenate([x, jnp.full_like(x, v)], -1)
        got = dj.p_mean_variance(S, out, x, t, variance="learned_range").variance[2, 0, 0, 0]
        assert float(got) == pytest.approx(expected, rel=1e-5)


@functools.partial(jax.jit, static_argnames=("shape", "num_steps"))
def _ancestral_chain(s, key, shape, num_steps=None):
    """The DDPM reverse chain written directly with p_sample_step in a scan."""
    denoise = gaussian_optimal_eps(S.alphas_cumprod, MU, SIGMA)
    k0, key = jax.random.split(key)
    x_T = draws.normal(k0, shape)

    def step(x, inputs):
        t, k = inputs
        tt = jnp.full((shape[0],), t)
        out = denoise(x, s.timesteps[tt])
        return dj.p_sample_step(s, out, x, tt, draws.normal(k, shape), clip_x0=False), None

    ts = jnp.arange(s.num_timesteps)[::-1]
    x0, _ = jax.lax.scan(step, x_T, (ts, jax.random.split(key, s.num_timesteps)))
    return x0


def test_optimal_gaussian_denoiser_reproduces_data_moments():
    shape = (4000, 2, 2, 1)
    x = np.asarray(_ancestral_chain(S, jax.random.key(0), shape), np.float64)
    n = x.size
    assert abs(x.mean() - MU) < 5 * SIGMA / np.sqrt(n) + 0.005
    assert abs(x.var() - SIGMA**2) < 5 * SIGMA**2 * np.sqrt(2 / n) + 0.005


def test_training_loss_of_optimal_predictor_equals_analytic_value():
    n = 20_000
    x0 = MU + SIGMA * draws.normal(jax.random.key(3), (n, 2, 2, 1))
    denoise = gaussian_optimal_eps(S.alphas_cumprod, MU, SIGMA)
    loss, aux = jax.jit(lambda x, k: dj.training_loss(denoise, S, x, k))(x0, jax.random.key(4))
    expected = gaussian_optimal_loss(S.alphas_cumprod, SIGMA)
    se = float(np.std(aux["loss"]) / np.sqrt(n))
    assert loss.dtype == jnp.float32 and aux["loss"].shape == (n,) and aux["t"].shape == (n,)
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)
    # Per example, the conditional expectation given t is a s^2 / (a s^2 + 1 - a).
    a = np.asarray(S.alphas_cumprod, np.float64)[np.asarray(aux["t"])]
    resid = np.asarray(aux["mse"]) - a * SIGMA**2 / (a * SIGMA**2 + 1 - a)
    assert abs(resid.mean()) < 4 * resid.std() / np.sqrt(n)


def _linear_model(params, x_t, t):
    return params["w"] * x_t + params["b"]


def test_training_loss_jit_vmap_grad():
    x0 = draws.uniform(jax.random.key(0), (8, 4, 4, 1), minval=-1, maxval=1)
    params = {"w": jnp.array(0.5), "b": jnp.array(0.1)}

    def loss_fn(p, key, **kw):
        return dj.training_loss(lambda x, t: _linear_model(p, x, t), S, x0, key, **kw)[0]

    key = jax.random.key(1)
    grads = jax.jit(jax.grad(loss_fn))(params, key)
    # Central finite differences in float32 agree with the gradient.
    jitted = jax.jit(loss_fn)  # one compiled loss (eager calls would compile every op)
    for name in params:
        h = 1e-2
        up = dict(params, **{name: params[name] + h})
        down = dict(params, **{name: params[name] - h})
        fd = (jitted(up, key) - jitted(down, key)) / (2 * h)
        assert float(grads[name]) == pytest.approx(float(fd), rel=1e-2, abs=1e-4)
    losses = jax.jit(jax.vmap(lambda k: loss_fn(params, k)))(jax.random.split(key, 3))
    assert losses.shape == (3,) and len(set(np.asarray(losses).tolist())) == 3
    every = jax.jit(lambda p, k: [loss_fn(p, k, prediction=prediction, weighting=weighting)  # one program
                                  for prediction in ("eps", "x0", "v") for weighting in ("none", "min_snr", "p2")])
    assert np.all(np.isfinite(np.asarray(every(params, key))))


def test_loss_weights_match_formulas():
    from diffusion_jax.processes.targets import levels

    t = jnp.array([0, 100, 500, 999])
    r = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
    r = r / (1 - r)
    cases = {("eps", "min_snr"): np.minimum(r, 5) / r, ("x0", "min_snr"): np.minimum(r, 5),
             ("v", "min_snr"): np.minimum(r, 5) / (r + 1), ("eps", "p2"): 1 / (1 + r),
             ("x0", "p2"): r / (1 + r), ("v", "none"): np.ones(4)}
    process = dj.as_process(S)
    for (prediction, weighting), expected in cases.items():
        got = dj.loss_weight(process, levels(process, t, t), prediction, weighting)
        np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_bf16_inputs_give_finite_float32_loss():
    x0 = draws.uniform(jax.random.key(0), (4, 4, 4, 3), minval=-1, maxval=1).astype(jnp.bfloat16)
    received = []

    def denoise(x, t):  # a bfloat16 model: casts its input itself, returns bfloat16
        received.append(x.dtype)
        return (0.3 * x).astype(jnp.bfloat16)

    for variance, fn in (("fixed_small", denoise),
                         ("learned_range", lambda x, t: jnp.concatenate([denoise(x, t)] * 2, -1))):
        loss, aux = dj.training_loss(fn, S, x0, jax.random.key(1), variance=variance)
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    # x_t is formed in float32 and reaches the model in float32, whatever the data's dtype.
    assert received == [jnp.float32, jnp.float32]


def test_hybrid_loss_vlb_trains_only_the_variance():
    x0 = draws.uniform(jax.random.key(0), (4, 4, 4, 1), minval=-1, maxval=1)

    def model(p, x, t):
        return jnp.concatenate([p["m"] * x, jnp.tanh(p["v"]) * jnp.ones_like(x)], -1)

    def parts(p, key):
        _, aux = dj.training_loss(lambda x, t: model(p, x, t), S, x0, key, variance="learned_range")
        return jnp.mean(aux["vlb"]), jnp.mean(aux["mse"])

    p = {"m": jnp.array(0.2), "v": jnp.array(0.3)}
    g_vlb, g_mse = jax.jit(jax.jacrev(parts))(p, jax.random.key(2))  # one program, both gradients
    assert float(g_vlb["m"]) == 0.0 and float(g_vlb["v"]) != 0.0  # stop-gradient on the mean
    assert float(g_mse["v"]) == 0.0 and float(g_mse["m"]) != 0.0


def test_bad_inputs_name_the_argument():
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match=r"t out of range.*\[0, 1000\)"):
        dj.q_sample(S, x, jnp.array([0, 1000]), x)
    with pytest.raises(ValueError, match="t must have shape"):
        dj.q_sample(S, x, jnp.array([0, 1, 2]), x)
    with pytest.raises(ValueError, match="integer"):
        dj.q_sample(S, x, jnp.array([0.5, 1.0]), x)
    with pytest.raises(ValueError, match=r"shape mismatch: x0 \(2, 4, 4, 1\), noise"):
        dj.q_sample(S, x, jnp.array([0, 1]), jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="model_output shape"):
        dj.p_sample_step(S, jnp.zeros((2, 4, 4, 2)), x, jnp.array([1, 1]), x)
    with pytest.raises(ValueError, match="twice"):
        dj.p_mean_variance(S, x, x, jnp.array([1, 1]), variance="learned_range")
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        dj.p_mean_variance(S, x, x, jnp.array([1, 1]), prediction="score")
    with pytest.raises(ValueError, match="unknown weighting"):
        dj.training_loss(lambda x, t: x, S, x, jax.random.key(0), weighting="snr+")
    with pytest.raises(ValueError, match="unknown variance"):
        dj.p_sample_step(S, x, x, jnp.array([1, 1]), x, variance="fixed_medium")
