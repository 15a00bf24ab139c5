"""Samplers: one compiled scan each, checked on the Gaussian data set whose optimal denoiser is
known, against each other, and sharded across 8 CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.samplers import decode, encode, sample, sampling_grid
from tests.oracles import (ddim_chain_map, ddpm_chain_moments, flow_map, gaussian_optimal_eps,
                           gaussian_optimal_learned_range)

S = dj.make_schedule("linear", 1000)
MU, SIGMA = 0.3, 0.5
ORACLE = gaussian_optimal_eps(S.alphas_cumprod, MU, SIGMA)
SHAPE = (2000, 2, 2, 1)


def assert_gaussian_moments(x, mu=MU, sigma=SIGMA, bias=0.01):
    x = np.asarray(x, np.float64)
    n = x.size
    assert abs(x.mean() - mu) < 5 * sigma / np.sqrt(n) + bias, (x.mean(), mu)
    assert abs(x.std() - sigma) < 5 * sigma / np.sqrt(2 * n) + bias, (x.std(), sigma)


@functools.lru_cache(maxsize=None)
def sampler(method, num_steps=None, shape=SHAPE, variance="fixed_small", denoise=ORACLE, **static):
    return jax.jit(functools.partial(sample, denoise, S, shape, method=method, num_steps=num_steps,
                                     clip_x0=False, variance=variance, **static))


ABAR64 = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def grid_abars(method, num_steps):
    """abar (float64) at the model timesteps the sampler visits, noisiest first."""
    return ABAR64[sampling_grid(S, method, num_steps).model_t]


def test_ddpm_reproduces_gaussian_data_and_the_exact_chain():
    # All 1000 steps: the data moments.
    assert_gaussian_moments(sampler("ddpm", 1000)(jax.random.key(0)))
    # Respaced to 100 steps, beta tilde is too small for this data: the chain's output variance
    # is below sigma^2, exactly as the float64 recursion of the respaced chain predicts.
    x = np.asarray(sampler("ddpm", 100)(jax.random.key(0)), np.float64)
    mean, var = ddpm_chain_moments(grid_abars("ddpm", 100), MU, SIGMA)
    assert var < SIGMA**2 - 0.01
    assert_gaussian_moments(x, mean, np.sqrt(var), bias=0.002)


@pytest.mark.parametrize("num_steps", [20, 50])
def test_ddim_is_exactly_the_deterministic_chain(num_steps):
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    x = sampler("ddim", num_steps)(jax.random.key(0), x_T=x_T)
    A, B = ddim_chain_map(grid_abars("ddim", num_steps), MU, SIGMA)
    np.testing.assert_allclose(x, A * np.asarray(x_T, np.float64) + B, atol=2e-4)
    # ...which approaches the probability-flow ODE's map (data moments) as the steps grow.
    A_ode, _ = flow_map(ABAR64[-1], MU, SIGMA)
    assert abs(A / A_ode - 1) < {20: 0.15, 50: 0.06}[num_steps]


def test_dpm_solver_follows_the_ode_in_few_steps():
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    A_ode, B_ode = flow_map(ABAR64[-1], MU, SIGMA)
    ideal = A_ode * np.asarray(x_T, np.float64) + B_ode
    rel_error = lambda x: float(np.sqrt(np.mean((np.asarray(x) - ideal) ** 2)) / SIGMA)
    dpm20 = rel_error(sampler("dpm_solver++", 20)(jax.random.key(0), x_T=x_T))
    dpm10 = rel_error(sampler("dpm_solver++", 10)(jax.random.key(0), x_T=x_T))
    ddim20 = rel_error(sampler("ddim", 20)(jax.random.key(0), x_T=x_T))
    ddim50 = rel_error(sampler("ddim", 50)(jax.random.key(0), x_T=x_T))
    assert dpm20 < 0.03 and dpm10 < 0.05, (dpm10, dpm20)
    assert dpm20 < ddim50 < ddim20, (dpm20, ddim50, ddim20)  # second order beats first order
    assert_gaussian_moments(sampler("dpm_solver++", 20)(jax.random.key(0)), bias=0.015)


def test_learned_range_exact_kernel_reproduces_gaussian_data():
    exact = gaussian_optimal_learned_range(S.alphas_cumprod, MU, SIGMA)
    assert_gaussian_moments(sampler("ddpm", 1000, variance="learned_range", denoise=exact)(jax.random.key(1)))


def test_ddim_eta_one_on_all_steps_is_the_ddpm_chain():
    """With t_prev = t - 1 and eta = 1, DDIM's update is algebraically DDPM's posterior step;
    with the same key both chains draw the same noise and must agree."""
    shape = (64, 2, 2, 1)
    ddpm = sampler("ddpm", 1000, shape)(jax.random.key(3))
    ddim = sampler("ddim", 1000, shape)(jax.random.key(3), eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-3)
    assert not np.allclose(sampler("ddim", 1000, shape)(jax.random.key(3), eta=0.0), ddpm, atol=1e-2)


def test_keys_and_determinism():
    f = sampler("ddim", 50, (16, 2, 2, 1))
    a, b, c = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # eta = 0 is deterministic given x_T: the key only draws x_T.
    x_T = jax.random.normal(jax.random.key(5), (16, 2, 2, 1))
    g = jax.jit(lambda k: sample(ORACLE, S, (16, 2, 2, 1), k, method="ddim", num_steps=50,
                                 clip_x0=False, x_T=x_T))
    np.testing.assert_array_equal(g(jax.random.key(0)), g(jax.random.key(1)))
    d = sampler("ddpm", 1000, (16, 2, 2, 1))
    assert not np.allclose(d(jax.random.key(0)), d(jax.random.key(1)))


def test_compiles_once_and_the_program_is_independent_of_steps():
    traces = []

    def counted(*args, **kw):
        traces.append(1)
        return sample(*args, **kw)

    f = jax.jit(functools.partial(counted, ORACLE, S, (8, 2, 2, 1), method="ddim", num_steps=50))
    f(jax.random.key(0), eta=0.0)
    f(jax.random.key(1), eta=0.7)
    f(jax.random.key(2), eta=1.0)
    assert len(traces) == 1
    # Guidance scale is traced too.
    labels = jnp.arange(8) % 2

    def cond_oracle(x, t, y):
        return ORACLE(x, t) + 0.1 * y.reshape(-1, 1, 1, 1)

    traces.clear()
    g = jax.jit(functools.partial(counted, cond_oracle, S, (8, 2, 2, 1), method="ddim", num_steps=20))
    for scale in (0.0, 1.5, 4.0):
        g(jax.random.key(0), guidance_scale=scale, cond=labels, null_cond=2)
    assert len(traces) == 1

    # The chain is one lax.scan, so the program XLA compiles does not grow with the step count:
    # the same lowered program line for line (only the constant tables are longer) and the
    # same loops after optimisation. (Structure, not timings: BENCHMARKS.md has the seconds.)
    def program(num_steps):
        fn = jax.jit(functools.partial(sample, ORACLE, S, (8, 2, 2, 1), method="ddpm", num_steps=num_steps))
        lowered = fn.lower(jax.random.key(0))
        return lowered.as_text(), lowered.compile().as_text()

    (low10, opt10), (low1000, opt1000) = program(10), program(1000)
    assert len(low10.splitlines()) == len(low1000.splitlines())
    assert low10.count("stablehlo.while") == low1000.count("stablehlo.while") >= 1
    assert opt10.count(" while(") == opt1000.count(" while(")
    assert abs(len(opt10.splitlines()) - len(opt1000.splitlines())) <= 0.05 * len(opt10.splitlines())


def test_ddim_inversion_round_trip_improves_with_steps():
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(7), (256, 2, 2, 1))
    errors = []
    for n in (10, 50, 200):
        latent = jax.jit(functools.partial(encode, ORACLE, S, num_steps=n))(x0)
        back = jax.jit(functools.partial(decode, ORACLE, S, num_steps=n))(latent)
        errors.append(float(jnp.sqrt(jnp.mean((back - x0) ** 2))))
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.02, errors
    # The latent is (close to) a standard normal draw.
    assert abs(float(latent.std()) - 1.0) < 0.1


def test_inpainting_keeps_known_pixels_and_fills_the_rest():
    """The data dims are independent, so the unknown pixels follow the unconditional chain."""
    shape = (2000, 2, 2, 1)
    known = jnp.full(shape, -0.8)
    mask = jnp.zeros(shape).at[:, 0].set(1.0)  # top row known
    x = sampler("ddpm", 1000, shape)(jax.random.key(0), known=known, mask=mask)
    np.testing.assert_allclose(x[:, 0], -0.8, atol=1e-6)
    assert_gaussian_moments(x[:, 1])
    x = sampler("ddim", 50, shape)(jax.random.key(0), known=known, mask=mask)
    np.testing.assert_allclose(x[:, 0], -0.8, atol=1e-6)
    A, B = ddim_chain_map(grid_abars("ddim", 50), MU, SIGMA)
    assert_gaussian_moments(x[:, 1], B, abs(A), bias=0.002)
    repaint = sampler("ddpm", 100, shape, repaint_resamples=3)
    x = repaint(jax.random.key(1), known=known, mask=mask)
    np.testing.assert_allclose(x[:, 0], -0.8, atol=1e-6)
    assert abs(float(x[:, 1].mean()) - MU) < 0.03 and 0.35 < float(x[:, 1].std()) < 0.55


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    means = jnp.array([-0.5, 0.5, 0.0])  # class 0, class 1, and the null label 2

    def cond_oracle(x, t, y):
        a = S.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        mu = means[y].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - a) / (a * SIGMA**2 + 1 - a) * (x - jnp.sqrt(a) * mu)

    shape = (32, 2, 2, 1)
    labels = jnp.arange(32) % 2
    run = lambda **kw: jax.jit(functools.partial(sample, cond_oracle, S, shape, method="ddim",
                                                 num_steps=20, clip_x0=False))(jax.random.key(0), **kw)
    unconditional = run(cond=jnp.full(32, 2))
    conditional = run(cond=labels)
    np.testing.assert_allclose(run(cond=labels, null_cond=2, guidance_scale=0.0), unconditional, atol=1e-5)
    np.testing.assert_allclose(run(cond=labels, null_cond=2, guidance_scale=1.0), conditional, atol=1e-5)
    strong = run(cond=labels, null_cond=2, guidance_scale=3.0)
    assert float(jnp.mean(strong[labels == 1]) - jnp.mean(conditional[labels == 1])) > 0.1


def test_sdedit_and_trajectory():
    shape = (512, 2, 2, 1)
    start = jnp.full(shape, 0.9)
    f = lambda step: jax.jit(functools.partial(sample, ORACLE, S, shape, method="ddim", num_steps=50,
                                               clip_x0=False, start_step=step))(
        jax.random.key(0), start_x=start)
    near = f(40)
    assert float(jnp.abs(near - 0.9).mean()) < 0.1  # little noise added: stays near the start
    assert_gaussian_moments(f(999))  # from pure noise: the data distribution
    x, traj = jax.jit(functools.partial(sample, ORACLE, S, shape, method="ddim", num_steps=50,
                                        clip_x0=False, trajectory_every=10))(jax.random.key(0))
    assert traj["x_t"].shape == (6, *shape) and traj["pred_x0"].shape == (6, *shape)
    np.testing.assert_array_equal(traj["x_t"][-1], x)
    assert int(traj["t"][0]) == 999 and int(traj["t"][-1]) == -1
    # The state is noise first and data at the end.
    assert abs(float(traj["x_t"][0].std()) - 1.0) < 0.1
    assert float(traj["x_t"][0].std()) > float(traj["x_t"][3].std()) > 0


def test_sharded_sampling_equals_unsharded_with_per_device_noise():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    shape = (16, 2, 2, 1)
    plain = jax.jit(functools.partial(sample, ORACLE, S, shape, method="ddpm", num_steps=100,
                                      clip_x0=False))(jax.random.key(4))
    sharded = jax.jit(functools.partial(sample, ORACLE, S, shape, method="ddpm", num_steps=100,
                                        clip_x0=False, sharding=sharding))(jax.random.key(4))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, plain, atol=1e-5)
    shards = [np.asarray(s.data) for s in sharded.addressable_shards]
    assert all(not np.allclose(shards[0], other) for other in shards[1:])


def test_bad_sampler_inputs():
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose one of .*'dpm\+\+_2m'"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), method="bogus")
    with pytest.raises(ValueError, match=r"sampler 'ddim' has no option\(s\) \['sigmas'\]"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), method="ddim", sigmas="karras")
    with pytest.raises(ValueError, match="repaint_resamples > 1 needs known"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), method="euler", repaint_resamples=2)
    with pytest.raises(ValueError, match="num_steps must be in"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), method="ddim", num_steps=2000)
    with pytest.raises(ValueError, match="null_cond"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), guidance_scale=2.0, cond=jnp.zeros(2, int))
    with pytest.raises(ValueError, match="mask"):
        sample(ORACLE, S, (2, 2, 2, 1), jax.random.key(0), known=jnp.zeros((2, 2, 2, 1)))


def test_one_key_per_sample_makes_each_image_independent_of_its_batch():
    """With a key per sample, image i is a function of its own key: the same bitwise in a batch
    of 12 or split 5 + 7, for plain, inpainting and RePaint chains."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(12))
    known = jnp.full((12, 2, 2, 1), 0.5)
    mask = jnp.zeros((12, 2, 2, 1)).at[:, 0].set(1.0)
    for method, kw in (("ddim", {"eta": 1.0}), ("ddpm", {"known": known, "mask": mask, "repaint_resamples": 2})):
        def run(k, rows):
            extra = {n: (v[rows] if n in ("known", "mask") else v) for n, v in kw.items()}
            return sample(ORACLE, S, (len(k), 2, 2, 1), k, method=method, num_steps=8, **extra)
        whole = run(keys, slice(0, 12))
        parts = jnp.concatenate([run(keys[:5], slice(0, 5)), run(keys[5:], slice(5, 12))])
        np.testing.assert_array_equal(whole, parts)
    with pytest.raises(ValueError, match="5 keys for a batch of 12"):
        sample(ORACLE, S, (12, 2, 2, 1), keys[:5], method="ddim", num_steps=4)
