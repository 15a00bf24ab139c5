"""Samplers on the continuous processes: step for step against diffusers'
FlowMatchEulerDiscreteScheduler (shift 1, 3, dynamic) and NVlabs/edm's `edm_sampler` (written out
below in torch float64, as its repository has it; with and without churn, noise given); and, on
Gaussian data with the exact model, every process x method x prediction against a float64 NumPy
implementation of the same algorithm from the same x_T, and against N(mu, s^2)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.errors import UsageError
from diffusion_jax.processes import make_process
from diffusion_jax.samplers.process import METHODS, ProcessContext
from tests.oracles import gaussian_exact_process_model, process_coefficients64

MU, S = 0.3, 0.5


def toy_velocity(x, model_time):
    return 0.8 * jnp.tanh(x) - 0.3 * x + 1e-4 * model_time[:, None, None, None]


@pytest.mark.parametrize("options,mu", [({}, None), ({"shift": 3.0}, None),
                                        ({"use_dynamic_shifting": True}, 0.7)])
def test_flow_euler_is_diffusers_flow_match_euler_step_for_step(options, mu):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    K, shape = 12, (2, 4, 4, 3)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    scheduler.set_timesteps(K, mu=mu)
    x_T = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x, theirs = torch.from_numpy(x_T).permute(0, 3, 1, 2), [x_T]
    for t in scheduler.timesteps:
        out = np.asarray(toy_velocity(jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.full((shape[0],), float(t))))
        x = scheduler.step(torch.from_numpy(out).permute(0, 3, 1, 2), t, x).prev_sample
        theirs.append(x.permute(0, 2, 3, 1).numpy())
    process = make_process("flow", mu=mu, **options)
    grid = process.default_grid(K).astype(np.float32)
    ctx = ProcessContext(toy_velocity, process, "velocity", False, K, {})
    ours, x = [x_T], jnp.asarray(x_T)
    for i in range(K):
        x, _, _ = METHODS["euler"].step(ctx, x, (), {"t": grid[i], "t_next": grid[i + 1], "i": i}, None)
        ours.append(np.asarray(x))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5 * (1 + np.abs(b).max()), err_msg=f"step {i}")
    # the whole chain through dj.sample, from the same x_T
    final = dj.sample(toy_velocity, process, shape, jax.random.key(0), method="euler", num_steps=K,
                      prediction="velocity", clip_x0=False, x_T=x_T)
    np.testing.assert_allclose(final, theirs[-1], atol=1e-5 * (1 + np.abs(theirs[-1]).max()))


def nvlabs_edm_sampler(net, latents, noises, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                       S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """NVlabs/edm generate.py's edm_sampler, with randn_like replaced by the given noises."""
    import torch
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    states = [x_next]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noises[i]
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        states.append(x_next)
    return states


@pytest.mark.parametrize("churn", [{}, {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}])
def test_edm_heun_is_nvlabs_edm_sampler_step_for_step(churn):
    torch = pytest.importorskip("torch")
    K, shape = 18, (2, 4, 4, 3)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal(shape)
    noises = rng.standard_normal((K, *shape))

    def denoiser_np(x, sigma):  # any D(x; sigma): a stand-in for the network
        return np.tanh(x / np.sqrt(sigma ** 2 + 0.25)) * 0.9 + 0.01 * np.log(sigma)

    net = lambda x, sigma: torch.from_numpy(denoiser_np(x.numpy(), float(sigma)))
    theirs = [s.numpy() for s in nvlabs_edm_sampler(net, torch.from_numpy(latents),
                                                     [torch.from_numpy(n) for n in noises], num_steps=K, **churn)]
    model = lambda x, sigma: jnp.tanh(x / jnp.sqrt(sigma[:, None, None, None] ** 2 + 0.25)) * 0.9 + 0.01 * jnp.log(sigma)[:, None, None, None]
    options = {"s_churn": churn.get("S_churn", 0.0), "s_tmin": churn.get("S_min", 0.0),
               "s_tmax": churn.get("S_max", float("inf")), "s_noise": churn.get("S_noise", 1.0)}
    process = make_process("edm")
    grid = process.default_grid(K).astype(np.float32)
    ctx = ProcessContext(model, process, "x0", False, K, {k: jnp.float32(v) for k, v in options.items()})
    x, ours = jnp.asarray(latents * 80.0, jnp.float32), []
    ours.append(np.asarray(x))
    for i in range(K):
        x, _, _ = METHODS["heun"].step(ctx, x, (), {"t": grid[i], "t_next": grid[i + 1], "i": i},
                                       jnp.asarray(noises[i], jnp.float32))
        ours.append(np.asarray(x))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=f"step {i}")


# ---------------------------------------------------------------------------- Gaussian data, exact model
def reference_chain(name, method, grid, x, noises=None):
    """The same algorithm in float64 NumPy with the exact denoiser E[x0 | x_t] of N(MU, S^2);
    `noises[i]` the fresh noise of step i (the stochastic methods)."""
    def slope(x, t):
        a, s, da, ds = process_coefficients64(name, np.float64(t))
        x0 = MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * MU)
        eps = (x - a * x0) / s
        return da * x0 + ds * eps, x0, eps

    x, x0_prev, h_prev = np.asarray(x, np.float64), None, None
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        d, x0, eps = slope(x, t)
        a, s = process_coefficients64(name, np.float64(t))[:2]
        a_n, s_n = process_coefficients64(name, np.float64(t_next))[:2]
        with np.errstate(divide="ignore"):
            h = np.log(a_n / s_n) - np.log(a / s)  # inf at either end
        r = np.exp(-h)
        if method == "ddim":
            x = a_n * x0 + s_n * eps
        elif method == "euler_ancestral":
            x = a_n * x0 + s_n * r * eps + s_n * np.sqrt(1 - r * r) * noises[i]
        elif method in ("dpm++_2m", "dpm++_2m_sde"):
            D = x0 if (i == 0 or t_next == 0) else x0 + h / (2 * h_prev) * (x0 - x0_prev)
            if method == "dpm++_2m":
                x = s_n / s * x + a_n * (1 - r) * D
            else:
                x = s_n / s * r * x + a_n * (1 - r * r) * D + s_n * np.sqrt(1 - r * r) * noises[i]
            x0_prev, h_prev = x0, h
        elif method == "euler" or t_next == 0:
            x = x + (t_next - t) * d
        else:
            x_e = x + (t_next - t) * d
            x = x + (t_next - t) * 0.5 * (d + slope(x_e, t_next)[0])
    return x


def chain_moments(name, method, grid, prior_std):
    """The exact mean and standard deviation of `reference_chain`'s output for x_T ~ N(0, prior_std^2):
    with the exact denoiser of Gaussian data every method is affine in x_T and its noises, so
    one run on the unit inputs gives the coefficients."""
    steps = len(grid) - 1
    x = np.zeros(steps + 2)
    x[1] = 1.0
    noises = np.eye(steps + 2)[2:]
    out = reference_chain(name, method, grid, x, noises)
    gains = out[1:] - out[0]
    return out[0], math.sqrt((gains[0] * prior_std) ** 2 + np.sum(gains[1:] ** 2))


NATURAL = {"vp": "eps", "edm": "x0", "flow": "velocity"}  # each process's own target; the others:
# tests/test_process_sampler_predictions.py (the full tier)


@pytest.mark.parametrize("name", ["vp", "edm", "flow"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gaussian_data_is_sampled_as_the_float64_algorithm_does(name, method):
    check_gaussian_chain(name, method, NATURAL[name])


def check_gaussian_chain(name, method, prediction):
    """Gaussian data with the exact model: the chain equals the float64 algorithm and its exact moments."""
    process = make_process(name)
    steps = 40
    if name == "flow" and prediction == "eps":  # alpha = 0 at t = 1: eps says nothing of x0
        with pytest.raises(UsageError, match="cannot start a 'flow' chain"):
            dj.sample(gaussian_exact_process_model(process, prediction, MU, S), process, (4, 1), jax.random.key(0), method=method,
                      num_steps=steps, prediction=prediction, clip_x0=False)
        return
    n = 20_000
    x_T = np.random.default_rng(2).standard_normal((n, 1)).astype(np.float32) * process.prior_std
    run = jax.jit(functools.partial(dj.sample, gaussian_exact_process_model(process, prediction, MU, S), process, (n, 1),
                                    method=method, num_steps=steps, prediction=prediction, clip_x0=False))
    ours = np.asarray(run(jax.random.key(0), x_T=x_T), np.float64)
    grid = process.default_grid(steps).astype(np.float32).astype(np.float64)
    key_steps = jax.random.split(jax.random.key(0))[1]  # the chain's noise: step i's from fold_in(key_steps, i)
    noises = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key_steps, i), (n, 1)))(jnp.arange(steps)),
                        np.float64)
    reference = reference_chain(name, method, grid, x_T, noises)
    np.testing.assert_allclose(ours, reference, atol=2e-4 * (1 + np.abs(reference).max()))
    # the result is the algorithm's own N(mean, std^2) (exact, from the float64 chain), which is
    # N(MU, S^2) up to the discretisation error: it falls as the steps grow (1000 steps: < 0.005)
    mean, std = chain_moments(name, method, grid, process.prior_std)
    assert abs(ours.mean() - mean) < 5 * std / math.sqrt(n), (ours.mean(), mean)
    assert abs(ours.std() - std) < 5 * std / math.sqrt(2 * n), (ours.std(), std)
    fine_grid = process.default_grid(1000).astype(np.float64)
    fine_mean, fine_std = chain_moments(name, method, fine_grid, process.prior_std)
    assert abs(fine_mean - MU) < 5e-3 and abs(fine_std - S) < 5e-3, (fine_mean, fine_std)
    assert abs(fine_std - S) <= abs(std - S) + 1e-4, (std, fine_std)


def test_what_the_process_samplers_refuse():
    process = make_process("flow")
    model = lambda x, t: x
    for kwargs, words in (({"method": "ddpm"}, "does not run a 'flow' process"),
                          ({"method": "heun", "s_churn": 10.0}, "needs process 'edm'"),
                          ({"method": "euler", "rho": 7.0}, "has no option"),
                          ({"method": "heun", "s_noise": -1.0}, "option s_noise = -1.0 is out of range"),
                          ({"method": "heun", "s_tmin": "abc"}, "option s_tmin must be a number, got 'abc'"),
                          ({"method": "ddim", "eta": 0.5}, "eta is not available on a 'flow' process"),
                          ({"method": "euler", "known": jnp.zeros((2, 1))}, "needs both known"),
                          ({"method": "euler", "start_x": jnp.zeros((2, 1)), "start_step": -1.0}, "below every step")):
        with pytest.raises(UsageError, match=words):
            dj.sample(model, process, (2, 1), jax.random.key(0), prediction="velocity", **kwargs)


@pytest.mark.parametrize("name", ["edm", "flow"])
def test_inpainting_repaint_sdedit_and_guidance_run_on_a_process(name):
    """The data's pixels are independent, so the unknown pixels of an inpainting follow the
    unconditional chain, whose exact moments the float64 chain gives."""
    process, n = make_process(name), 4000
    shape, steps = (n, 2, 1, 1), 40
    model = gaussian_exact_process_model(process, "x0", MU, S)
    run = lambda static, key=0, **traced: jax.jit(functools.partial(
        dj.sample, model, process, shape, prediction="x0", clip_x0=False, num_steps=steps, **static))(
        jax.random.key(key), **traced)
    grid = process.default_grid(steps).astype(np.float32).astype(np.float64)
    known, mask = jnp.full(shape, -0.8), jnp.zeros(shape).at[:, 0].set(1.0)
    for method, static in (("ddim", {}), ("euler_ancestral", {}), ("euler_ancestral", {"repaint_resamples": 3})):
        x = np.asarray(run({"method": method, **static}, known=known, mask=mask), np.float64)
        np.testing.assert_allclose(x[:, 0], -0.8, atol=1e-5)
        mean, std = chain_moments(name, method, grid, process.prior_std)
        slack = 0.02 if static else 0.0  # RePaint's resampling is not the plain chain's
        assert abs(x[:, 1].mean() - mean) < 5 * std / math.sqrt(n) + slack, (method, static, x[:, 1].mean(), mean)
        assert abs(x[:, 1].std() - std) < 5 * std / math.sqrt(2 * n) + slack, (method, static, x[:, 1].std(), std)
    # SDEdit: from a model time near the clean end the image stays near its start; from the
    # noisy end it is the unconditional chain's distribution
    start = jnp.full(shape, 0.9)
    low = float(process.model_time(np.float32(grid[-4])))
    x, trajectory = run({"method": "ddim", "start_step": low, "trajectory_every": 1}, start_x=start)
    assert float(trajectory["t"][0]) <= low and trajectory["x_t"].shape[0] == 4  # 3 steps, then the end
    assert float(jnp.abs(x - 0.9).mean()) < 0.1
    x = np.asarray(run({"method": "ddim", "start_step": float(process.model_time(np.float32(grid[0])))},
                       start_x=start), np.float64)
    mean, std = chain_moments(name, "ddim", grid, process.prior_std)
    assert abs(x.mean() - mean) < 0.03 and abs(x.std() - std) < 0.03, (x.mean(), x.std(), mean, std)
    # classifier-free guidance: scale 0 is the null condition's chain, 1 the condition's
    means = jnp.array([-0.5, 0.5, 0.0])  # class 0, class 1, the null class 2
    cond_model = lambda x, t, y: gaussian_exact_process_model(process, "x0", means[y].reshape(-1, 1, 1, 1), S)(x, t)
    labels = jnp.arange(n) % 2
    guided = lambda **kw: jax.jit(functools.partial(dj.sample, cond_model, process, shape, method="dpm++_2m",
                                                    prediction="x0", clip_x0=False, num_steps=10))(jax.random.key(0), **kw)
    np.testing.assert_allclose(guided(cond=labels, null_cond=2, guidance_scale=0.0), guided(cond=jnp.full(n, 2)),
                               atol=1e-5 * process.prior_std)
    np.testing.assert_allclose(guided(cond=labels, null_cond=2, guidance_scale=1.0), guided(cond=labels),
                               atol=1e-5 * process.prior_std)
