"""Every registered sampler on every process, on the Gaussian data set whose exact denoiser is
known: the chain equals its float64 NumPy transcription from the same x_T and noise, its output
has the moments that transcription implies (N(mu, s^2) with enough steps), a deterministic chain
ignores the key, and a traced step count runs the fixed-length chain without compiling again.
Then the wrappers every sampler shares: guidance, inpainting, RePaint, SDEdit, the trajectory
buffer, per-sample keys, sharding, DDIM inversion, and what `sample` refuses."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from diffusion_jax.errors import UsageError
from diffusion_jax.samplers import Edit, sample, sampler_names, sampling_grid
from tests.oracles import gaussian_average_velocity_model, gaussian_consistency_model, gaussian_exact_process_model

MU, S = 0.3, 0.5
PROCESSES = {"ddpm": dj.as_process(dj.make_schedule("linear", 1000)), "vp": dj.make_process("vp"),
             "edm": dj.make_process("edm"), "flow": dj.make_process("flow")}
NATURAL = {"ddpm": "eps", "vp": "eps", "edm": "x0", "flow": "velocity"}  # each process's own target
STOCHASTIC = {"ddpm", "euler_ancestral", "dpm++_2m_sde", "lcm", "consistency"}


def exact_denoiser(x, a, s):
    """E[x0 | x] and its eps in float64 for data N(MU, S^2) at level (a, s)."""
    x0 = MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * MU)
    return x0, (x - a * x0) / s


def reference_chain(method, process, grid, x, noises):
    """The sampler written out in float64 from its papers' forms on the grid's levels, with the
    exact denoiser; `noises[i]` the fresh noise of step i."""
    alpha, sigma = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
    k, K = process.ode_frame, len(alpha) - 1
    x, history = np.asarray(x, np.float64), []
    for i in range(K):
        a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        x0, eps = exact_denoiser(x, a, s)
        var = s ** 2 - (a / a1) ** 2 * s1 ** 2  # q(x | x'): the forward kernel from the next level
        post = var * s1 ** 2 / s ** 2  # q(x' | x, x0)'s variance
        if method == "ddpm":  # Ho et al. eq. 7: the posterior mean and variance
            x = a1 * var / s ** 2 * x0 + (a / a1) * (s1 ** 2 / s ** 2) * x + np.sqrt(post) * noises[i]
        elif method in ("ddim", "euler_ancestral"):  # Song et al. eq. 12, eta = 0 and 1
            eta2 = 1.0 if method == "euler_ancestral" else 0.0
            x = a1 * x0 + np.sqrt(s1 ** 2 - eta2 * post) * eps + np.sqrt(eta2 * post) * noises[i]
        elif method in ("euler", "heun"):  # the ODE in y = x / (a + k s), tau = s / (a + k s): dy/dtau = eps - k x0
            c, c1 = 1 / (a + k * s), 1 / (a1 + k * s1)
            tau, tau1 = s * c, s1 * c1
            d = eps - k * x0
            y = c * x + (tau1 - tau) * d
            if method == "heun" and s1 > 0:
                x0e, epse = exact_denoiser(y / c1, a1, s1)
                y = c * x + (tau1 - tau) * 0.5 * (d + epse - k * x0e)
            x = y / c1
        elif method in ("dpm++_2m", "dpm++_2m_sde", "dpm_solver++"):  # Lu et al. 2022, DPM-Solver++(2M)
            with np.errstate(divide="ignore"):
                h = np.log(a1 / s1) - np.log(a / s)
            first = i == 0 or s1 == 0 or (method == "dpm_solver++" and K < 15 and i == K - 2)
            D = x0 if first else x0 + h / (2 * history[-1][1]) * (x0 - history[-1][0])
            history.append((x0, h))
            if method == "dpm++_2m_sde":
                x = s1 / s * np.exp(-h) * x + a1 * -np.expm1(-2 * h) * D + s1 * np.sqrt(-np.expm1(-2 * h)) * noises[i]
            else:
                x = s1 / s * x + a1 * -np.expm1(-h) * D
        elif method == "lcm":  # Luo et al. 2023: the consistency boundary scalings at time 10 t, then noised afresh
            st = float(grid.model_t[i]) * 10.0
            x = a1 * (st / np.sqrt(st ** 2 + 0.25) * x0 + 0.25 / (st ** 2 + 0.25) * x) + s1 * noises[i]
        elif method == "consistency":  # Song et al. 2023: the ODE map to 0, noised afresh to the next level
            x = a1 * (MU + S * (x - a * MU) / np.sqrt(a ** 2 * S ** 2 + s ** 2)) + s1 * noises[i]
        elif method == "meanflow":  # Geng et al. 2025: the jump with the exact average velocity is the ODE map
            x = a1 * MU + np.sqrt(a1 ** 2 * S ** 2 + s1 ** 2) / np.sqrt(a ** 2 * S ** 2 + s ** 2) * (x - a * MU)
        else:
            x, history = unipc_reference(i, K, x, x0, alpha, sigma, history)
    return x


def unipc_reference(i, K, x, m, alpha, sigma, history):
    """diffusers' UniPCMultistepScheduler.step (bh2, order 2, predict_x0), transcribed with NumPy's
    linear solve: the corrector of the previous prediction, then the predictor."""
    lam = np.log(alpha) - np.log(sigma, where=sigma > 0, out=np.full_like(sigma, -np.inf))
    if i > 0:  # UniC: x (the prediction at level i) from the previous level's sample
        x_last, order = history[-1][2], history[-1][3]
        ms = [h[0] for h in history]
        h = lam[i] - lam[i - 1]
        b_h = np.expm1(-h)
        rks, d1s = ([(lam[i - 2] - lam[i - 1]) / h], [(ms[-2] - ms[-1]) / ((lam[i - 2] - lam[i - 1]) / h)]) \
            if order == 2 else ([], [])
        rks = np.array(rks + [1.0])
        hh, phi, fact, b = -h, b_h / -h - 1, 1, []
        for n in range(1, order + 1):
            b.append(phi * fact / b_h)
            fact *= n + 1
            phi = phi / hh - 1 / fact
        rhos = np.linalg.solve(np.stack([rks ** (n - 1) for n in range(1, order + 1)]), np.array(b)) \
            if order == 2 else np.array([0.5])
        base = sigma[i] / sigma[i - 1] * x_last - alpha[i] * b_h * ms[-1]
        corr = sum(r * d for r, d in zip(rhos[:-1], d1s))
        x = base - alpha[i] * b_h * (corr + rhos[-1] * (m - ms[-1]))
    order = 1 if i == 0 or i == K - 1 else 2
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[i + 1] - lam[i]
        b_h = np.expm1(-h)
        x_next = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * b_h * m
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            x_next = x_next - alpha[i + 1] * b_h * 0.5 * (history[-1][0] - m) / rk
    return x_next, history + [(m, h, x, order)]


def chain_moments(method, process, grid):
    """The exact mean and standard deviation of `reference_chain`'s output from x_T ~ N(0,
    prior_std^2): with the exact denoiser of Gaussian data every sampler is affine in x_T and its
    noises, so one run on unit inputs gives the coefficients."""
    steps = len(grid.alpha) - 1
    x = np.zeros(steps + 2)
    x[1] = 1.0
    out = reference_chain(method, process, grid, x, np.eye(steps + 2)[2:])
    gains = out[1:] - out[0]
    return out[0], math.sqrt((gains[0] * process.prior_std) ** 2 + np.sum(gains[1:] ** 2))


def chain_noises(key, num_steps, shape):
    """The noise step i of `sample` draws: split(fold_in(split(key)[1], i))[0]."""
    key_steps = jax.random.split(key)[1]
    return np.asarray(jax.vmap(lambda i: draws.normal(jax.random.split(jax.random.fold_in(key_steps, i))[0],
                                                           shape))(jnp.arange(num_steps)), np.float64)


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("method", sampler_names())
def test_every_sampler_on_every_process_is_its_float64_chain(name, method):
    """(meanflow's model is the average velocity of a continuous process, `gaussian_average_velocity_model`:
    on DDPM's integer times it refuses to jump; consistency's the consistency function.)"""
    process, prediction, n, steps = PROCESSES[name], NATURAL[name], 20_000, 12
    model = gaussian_exact_process_model(process, prediction, MU, S)
    if method == "meanflow":
        if name == "ddpm":
            with pytest.raises(UsageError, match="integer timesteps"):
                sample(model, process, (2, 1), jax.random.key(0), method=method, num_steps=steps, prediction=prediction)
            return
        model, prediction = gaussian_average_velocity_model(process, MU, S), "velocity"
    if method == "consistency":  # its model is the consistency function: the exact ODE map to t = 0
        model, prediction = gaussian_consistency_model(process, MU, S), "x0"
    x_T = (np.random.default_rng(2).standard_normal((n, 1)) * process.prior_std).astype(np.float32)
    run = jax.jit(functools.partial(sample, model, process, (n, 1), method=method, num_steps=steps,
                                    prediction=prediction, clip_x0=False))
    ours = np.asarray(run(jax.random.key(0), x_T=x_T), np.float64)
    grid = sampling_grid(process, method, steps)
    reference = reference_chain(method, process, grid, x_T, chain_noises(jax.random.key(0), grid.num_steps, (n, 1)))
    np.testing.assert_allclose(ours, reference, atol=2e-4 * (1 + np.abs(reference).max()))
    if method not in STOCHASTIC:  # deterministic given x_T: the key changes no bit
        np.testing.assert_array_equal(np.asarray(run(jax.random.key(1), x_T=x_T), np.float64), ours)
    mean, std = chain_moments(method, process, grid)
    assert abs(ours.mean() - mean) < 5 * std / math.sqrt(n) and abs(ours.std() - std) < 5 * std / math.sqrt(2 * n)
    if method == "lcm":  # a consistency model's sampler: the posterior-mean denoiser here is not one
        return
    fine_mean, fine_std = chain_moments(method, process, sampling_grid(process, method, 1000))
    assert abs(fine_mean - MU) < 5e-3 and abs(fine_std - S) < 5e-3, (fine_mean, fine_std)


@pytest.mark.parametrize("method,options", [("dpm_solver++", {}), ("heun", {"s_churn": 5.0}), ("ddpm", {}),
                                            ("unipc", {"sigmas": "process", "spacing": "trailing"})])
def test_a_traced_step_count_compiles_once_and_runs_the_fixed_chain(method, options):
    process = PROCESSES["ddpm"]
    model = gaussian_exact_process_model(process, "eps", MU, S)
    traced = jax.jit(functools.partial(sample, model, process, (8, 2), method=method, max_steps=30, **options))
    for steps in (11, 30):  # dpm_solver++'s log-SNR grid of 11 steps keeps 10 distinct timesteps
        fixed = jax.jit(functools.partial(sample, model, process, (8, 2), method=method, num_steps=steps,
                                          **options))(jax.random.key(steps))
        np.testing.assert_allclose(traced(jax.random.key(steps), num_steps=steps), fixed, rtol=1e-6, atol=1e-6)
    assert traced._cache_size() == 1
    assert np.isnan(np.asarray(traced(jax.random.key(0), num_steps=31))).all()  # never a clamped grid
    with pytest.raises(UsageError, match=r"num_steps must be in \[1, max_steps = 30\]"):
        sample(model, process, (8, 2), jax.random.key(0), method=method, max_steps=30, num_steps=31, **options)


def test_the_registry_and_what_sample_refuses():
    assert sampler_names() == ("ddpm", "ddim", "dpm_solver++", "euler", "heun", "euler_ancestral", "dpm++_2m",
                               "dpm++_2m_sde", "unipc", "lcm", "meanflow", "consistency")
    model, flow, ddpm = (lambda x, t: x), PROCESSES["flow"], PROCESSES["ddpm"]
    x = jnp.zeros((2, 4, 4, 1))
    for process, kwargs, words in (
            (ddpm, {"method": "bogus"}, "unknown method 'bogus'"),
            (ddpm, {"method": "ddim", "s_churn": 1.0}, r"has no option\(s\) \['s_churn'\]"),
            (ddpm, {"method": "ddim", "eta": 1.5}, "eta = 1.5 is out of range"),
            (ddpm, {"method": "heun", "s_noise": -1.0}, "s_noise = -1.0 is out of range"),
            (ddpm, {"method": "heun", "s_tmin": "abc"}, "s_tmin must be a number, got 'abc'"),
            (ddpm, {"method": "ddim", "rho": 5.0}, "rho shapes the Karras grid"),
            (ddpm, {"method": "ddim", "original_steps": 20}, "original_steps shapes the LCM grid"),
            (ddpm, {"method": "lcm", "num_steps": 51}, "takes at most original_steps = 50"),
            (flow, {"method": "lcm", "sigmas": "lcm"}, "sigmas='lcm' chooses among a model's integer timesteps"),
            (ddpm, {"method": "euler", "spacing": "trailing"}, "choose the model's timesteps"),
            (ddpm, {"method": "ddim", "num_steps": 2000}, r"num_steps must be an integer in \[1, 1000\]"),
            (ddpm, {"method": "ddim", "num_steps": 2.5}, "num_steps must be an integer"),
            (ddpm, {"method": "dpm++_2m", "lower_order_final": "maybe"}, "must be true or false"),
            (ddpm, {"method": "ddim", "x_T": jnp.zeros((2, 1, 4, 4))}, r"x_T has shape \(2, 1, 4, 4\)"),
            (ddpm, {"edit": Edit(known=x)}, "needs both known"),
            (ddpm, {"edit": Edit(repaint_resamples=2)}, "repaint_resamples > 1 needs known"),
            (ddpm, {"edit": Edit(start_x=x, start_step=-1)}, "below every step"),
            (flow, {"method": "euler", "sigmas": "karras"}, "takes to infinity"),
            (flow, {"method": "ddim", "spacing": "leading"}, "has none"),
            (flow, {"method": "ddim", "last_step_to": "t0"}, "process has none"),
            (flow, {"method": "euler", "prediction": "eps"}, "cannot start a 'flow' chain where alpha = 0")):
        with pytest.raises(UsageError, match=words):
            sample(model, process, x.shape, jax.random.key(0), **{"method": "ddim", **kwargs})
    with pytest.raises(UsageError, match="5 keys for a batch of 12"):
        sample(model, ddpm, (12, 1), jax.random.split(jax.random.key(0), 5), method="ddim", num_steps=4)


def test_guidance_zero_is_the_null_chain_and_one_the_conditional():
    process = PROCESSES["ddpm"]
    means = jnp.array([-0.5, 0.5, 0.0])  # class 0, class 1, and the null label 2
    model = lambda x, t, y: gaussian_exact_process_model(process, "eps", means[y].reshape(-1, 1, 1, 1), S)(x, t)
    labels = jnp.arange(32) % 2
    chain = lambda m: sample(m, process, (32, 2, 2, 1), jax.random.key(0), method="ddim", num_steps=20, clip_x0=False)
    guided = jax.jit(lambda scale: chain(dj.guided_denoise_fn(model, labels, 2, scale)))  # the scale traced
    plain = jax.jit(lambda y: chain(dj.guided_denoise_fn(model, y)))
    np.testing.assert_allclose(guided(0.0), plain(jnp.full(32, 2)), atol=1e-5)
    np.testing.assert_allclose(guided(1.0), plain(labels), atol=1e-5)
    strong, plain = guided(3.0), plain(labels)
    assert float(jnp.mean(strong[labels == 1]) - jnp.mean(plain[labels == 1])) > 0.1


@pytest.mark.parametrize("name,method", [("ddpm", "ddpm"), ("ddpm", "ddim"), ("edm", "euler_ancestral"),
                                         ("flow", "dpm++_2m")])
def test_inpainting_repaint_sdedit_and_the_trajectory_wrap_any_sampler(name, method):
    """The data's pixels are independent, so the unknown pixels of an inpainting follow the plain
    chain, whose exact moments the float64 chain gives."""
    process, n, steps = PROCESSES[name], 4000, 30
    model = gaussian_exact_process_model(process, NATURAL[name], MU, S)
    run = lambda key=0, **kw: jax.jit(functools.partial(sample, model, process, (n, 2, 1, 1), method=method,
                                                        num_steps=steps, prediction=NATURAL[name], clip_x0=False,
                                                        **kw))(jax.random.key(key))
    known, mask = jnp.full((n, 2, 1, 1), -0.8), jnp.zeros((n, 2, 1, 1)).at[:, 0].set(1.0)
    mean, std = chain_moments(method, process, sampling_grid(process, method, steps))
    for resamples, slack in ((1, 0.0), (3, 0.03))[:2 if method in ("ddpm", "euler_ancestral") else 1]:
        # RePaint (the ancestral samplers') resamples: not the plain chain's moments
        x = np.asarray(run(edit=Edit(known, mask, repaint_resamples=resamples)), np.float64)
        np.testing.assert_allclose(x[:, 0], -0.8, atol=1e-5)
        assert abs(x[:, 1].mean() - mean) < 5 * std / math.sqrt(n) + slack, (resamples, x[:, 1].mean(), mean)
        assert abs(x[:, 1].std() - std) < 5 * std / math.sqrt(2 * n) + slack, (resamples, x[:, 1].std(), std)
    # SDEdit from a level near the clean end stays near its start; the trajectory has the levels walked
    grid = sampling_grid(process, method, steps)
    low = float(grid.model_t[-4])
    x, trajectory = run(edit=Edit(start_x=jnp.full((n, 2, 1, 1), 0.9), start_step=low), trajectory_every=1)
    assert float(trajectory["t"][0]) <= low and trajectory["x_t"].shape[0] == 4  # 3 steps, then the end
    np.testing.assert_array_equal(trajectory["x_t"][-1], x)
    assert float(jnp.abs(x - 0.9).mean()) < 0.3 and float(trajectory["t"][-1]) == -1.0  # the data's: ~0.65


def test_one_key_per_sample_makes_each_image_independent_of_its_batch():
    """With a key per sample, image i is a function of its own key alone: bitwise the same in a
    batch of 8 or split 4 + 4, for plain, inpainting and RePaint chains."""
    process = PROCESSES["ddpm"]
    model = gaussian_exact_process_model(process, "eps", MU, S)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(8))
    known, mask = jnp.full((8, 2, 2, 1), 0.5), jnp.zeros((8, 2, 2, 1)).at[:, 0].set(1.0)
    for method, kw, edit in (("ddim", {"eta": 1.0}, lambda rows: None),
                             ("ddpm", {}, lambda rows: Edit(known[rows], mask[rows], repaint_resamples=2))):
        chain = jax.jit(lambda k, e: sample(model, process, (len(k), 2, 2, 1), k, method=method, num_steps=8,
                                            edit=e, **kw))  # one function: the two batch sizes, two programs
        run = lambda k, rows: chain(k, edit(rows))
        whole = run(keys, slice(0, 8))
        parts = jnp.concatenate([run(keys[:4], slice(0, 4)), run(keys[4:], slice(4, 8))])
        np.testing.assert_array_equal(whole, parts)


@pytest.mark.devices(8)
def test_sharded_sampling_equals_unsharded_with_per_device_noise():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    process = PROCESSES["ddpm"]
    model = gaussian_exact_process_model(process, "eps", MU, S)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P("data"))
    run = lambda **kw: jax.jit(functools.partial(sample, model, process, (16, 2, 2, 1), method="ddpm", num_steps=100,
                                                 clip_x0=False, **kw))(jax.random.key(4))
    plain, sharded = run(), run(sharding=sharding)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, plain, atol=1e-5)
    shards = [np.asarray(s.data) for s in sharded.addressable_shards]
    assert all(not np.allclose(shards[0], other) for other in shards[1:])


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_ddim_inversion_round_trip_improves_with_steps(name):
    process = PROCESSES[name]
    model = gaussian_exact_process_model(process, NATURAL[name], MU, S)
    x0 = MU + S * draws.normal(jax.random.key(7), (256, 2, 2, 1))
    errors = []
    for n in (10, 40, 160):
        latent = jax.jit(functools.partial(dj.encode, model, process, num_steps=n, prediction=NATURAL[name]))(x0)
        back = jax.jit(functools.partial(dj.decode, model, process, num_steps=n, prediction=NATURAL[name]))(latent)
        errors.append(float(jnp.sqrt(jnp.mean((back - x0) ** 2))))
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.02, errors
    assert abs(float(latent.std()) - 1.0) < 0.1  # the latent is (close to) a standard normal draw
