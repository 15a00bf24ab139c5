"""Sigma-space samplers (Euler, Heun, Euler ancestral, DPM++ 2M) and the schedule options of
diffusers: checked on Gaussian data, whose exact denoiser and probability-flow ODE solution
are known at every sigma, and step by step against diffusers' schedulers (torch, float32)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.samplers import get_sampler, sample, sampling_grid, sampler_names
from diffusion_jax.samplers.registry import StepContext
from diffusion_jax.samplers.sigma import schedule_sigmas
from diffusion_jax.schedules import rescale_zero_terminal_snr, spaced_timesteps
from tests.oracles import gaussian_optimal_continuous

T = 1000
S = dj.make_schedule("linear", T)
MU, SIGMA = 0.3, 0.5
ORACLE = gaussian_optimal_continuous(S.alphas_cumprod, MU, SIGMA)
SIGMA_SAMPLERS = ("euler", "heun", "euler_ancestral", "dpm++_2m", "dpm++_2m_sde")


ZERO_SNR = dj.make_schedule("linear", T, zero_terminal_snr=True)
SCHEDULES = {"linear": S, "zero_snr": ZERO_SNR}


@functools.lru_cache(maxsize=None)
def sampler(method, num_steps, shape, denoise=ORACLE, schedule="linear", prediction="eps", **static):
    return jax.jit(functools.partial(sample, denoise, SCHEDULES[schedule], shape, method=method,
                                     num_steps=num_steps, clip_x0=False, prediction=prediction, **static))


def assert_gaussian(x, bias=0.02):
    x = np.asarray(x, np.float64)
    n = x.size
    assert abs(x.mean() - MU) < 5 * SIGMA / np.sqrt(n) + bias, x.mean()
    assert abs(x.std() - SIGMA) < 5 * SIGMA / np.sqrt(2 * n) + bias, x.std()


def test_the_registry_lists_every_sampler_once():
    assert set(SIGMA_SAMPLERS) | {"ddpm", "ddim", "dpm_solver++"} == set(sampler_names())
    assert get_sampler("heun").model_calls(18) == 35


def test_grid_options_that_would_do_nothing_are_errors():
    with pytest.raises(ValueError, match="needs sigmas='model'"):
        sampling_grid(S, "euler", 10, spacing="trailing")
    with pytest.raises(ValueError, match="needs sigmas='karras'"):
        sampling_grid(S, "dpm++_2m", 10, sigmas="exponential", rho=3.0)
    trailing = sampling_grid(S, "euler", 10, sigmas="model", spacing="trailing")
    np.testing.assert_array_equal(trailing.model_t, spaced_timesteps(T, 10, "trailing")[::-1])
    assert trailing.model_t[0] == T - 1 and trailing.steps["sigma_next"][-1] == 0.0


@pytest.mark.parametrize("option,value", [("s_churn", -1.0), ("s_churn", -50), ("s_churn", float("nan")),
                                          ("rho", -7.0), ("rho", 0), ("rho", float("inf")), ("rho", "abc"),
                                          ("s_noise", -0.1), ("s_tmin", float("inf")), ("sigmas", "cosine")])
def test_options_outside_their_declared_range_are_refused_not_run(option, value):
    # s_churn=-1 put sigma_hat below sigma, s_churn=nan made every value NaN, rho=-7 drew another
    # grid: each ran with rc 0. Every option is declared once, with its type and range.
    with pytest.raises(ValueError, match=f"sampler 'heun' option {option}"):
        sampling_grid(S, "heun", 10, **{option: value})
    with pytest.raises(ValueError, match=f"option {option}"):
        sample(ORACLE, S, (2, 1), jax.random.key(0), method="heun", num_steps=4, **{option: value})
    assert get_sampler("heun").check_options({"rho": "3", "s_tmax": float("inf")}) == {"rho": 3.0,
                                                                                       "s_tmax": float("inf")}


def test_eta_is_an_option_of_ddim_only():
    with pytest.raises(ValueError, match=r"sampler 'heun' has no option\(s\) \['eta'\]"):
        sample(ORACLE, S, (2, 1), jax.random.key(0), method="heun", num_steps=4, eta=0.7)
    a = sample(ORACLE, S, (2, 1), jax.random.key(0), method="ddim", num_steps=4, eta=0.5)
    b = sample(ORACLE, S, (2, 1), jax.random.key(0), method="ddim", num_steps=4, eta=0.0)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 50), ("euler_ancestral", 200),
                                          ("dpm++_2m", 50), ("dpm++_2m_sde", 100)])
def test_each_sampler_reproduces_gaussian_data(method, steps):
    # (First-order samplers shrink the variance by O(1 / steps): 0.44 for 0.5 at 25 Euler steps,
    # as DDIM; 0.486 at 100.)
    x = sampler(method, steps, (4000, 2, 2, 1))(jax.random.key(1))
    assert_gaussian(x, bias=0.025)


def exact_flow(x_T_vp, sigma_max):
    """The probability-flow ODE's solution for N(MU, SIGMA^2) data: in x = x0 + sigma eps,
    x(sigma) - MU is proportional to sqrt(SIGMA^2 + sigma^2)."""
    x_ve = np.asarray(x_T_vp, np.float64) * np.sqrt(1 + sigma_max**2)
    return MU + (x_ve - MU) * SIGMA / np.sqrt(SIGMA**2 + sigma_max**2)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("dpm++_2m", 2)])
def test_deterministic_samplers_converge_at_their_order(method, order):
    shape = (256, 1, 1, 1)
    x_T = jax.random.normal(jax.random.key(2), shape)
    sigma_max = float(schedule_sigmas(S)[-1])
    exact = exact_flow(x_T, sigma_max)
    errors = []
    for k in (16, 32, 64):
        x = sampler(method, k, shape, sigmas="exponential")(jax.random.key(0), x_T=x_T)
        errors.append(float(np.max(np.abs(np.asarray(x, np.float64) - exact))))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    # Doubling the steps divides the error by about 2^order (measured against the exact flow).
    assert np.all(ratios > 0.75 * 2**order) and np.all(ratios < 1.6 * 2**order), (errors, ratios)


def test_ancestral_steps_keep_the_marginal_variance():
    """Every state of the ancestral chain has the forward process's marginal at its level:
    VP variance abar SIGMA^2 + 1 - abar around sqrt(abar) MU."""
    shape = (4000, 2, 2, 1)
    _, traj = sampler("euler_ancestral", 200, shape, trajectory_every=25)(jax.random.key(3))
    sig = np.asarray(sampling_grid(S, "euler_ancestral", 200).steps["sigma"], np.float64)[::25]
    for x, s in zip(np.asarray(traj["x_t"])[1:-1], sig[1:]):
        ab = 1 / (1 + s**2)
        assert abs(x.mean() - np.sqrt(ab) * MU) < 0.02, s
        assert abs(x.var() / (ab * SIGMA**2 + 1 - ab) - 1) < 0.05, (s, x.var())


V_ORACLE_ZERO_SNR = gaussian_optimal_continuous(ZERO_SNR.alphas_cumprod, MU, SIGMA, prediction="v")


@pytest.mark.parametrize("method", SIGMA_SAMPLERS + ("ddim", "dpm_solver++"))
def test_zero_terminal_snr_with_v_prediction(method):
    """Lin et al. 2023: abar_T = 0 with a v-prediction model samples the data, finite."""
    assert float(ZERO_SNR.alphas_cumprod[-1]) == 0.0
    x = sampler(method, 200 if method.startswith("euler") else 60, (4000, 2, 1, 1), denoise=V_ORACLE_ZERO_SNR, schedule="zero_snr",
                prediction="v")(jax.random.key(4))
    assert np.isfinite(np.asarray(x)).all()
    assert_gaussian(x, bias=0.03)


def test_churn_guidance_and_keys_do_not_recompile():
    traces = []

    def counted(*args, **kw):
        traces.append(1)
        return sample(*args, **kw)

    shape = (8, 2, 2, 1)
    for method in ("euler", "heun"):
        traces.clear()
        f = jax.jit(functools.partial(counted, ORACLE, S, shape, method=method, num_steps=6))
        outs = [f(jax.random.key(k), s_churn=c, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
                for k, c in ((0, 0.0), (1, 0.0), (1, 40.0))]
        assert len(traces) == 1
        assert not np.array_equal(outs[1], outs[2])  # churn on: other numbers, same program
    labels = jnp.arange(8) % 2
    cond = lambda x, t, y: ORACLE(x, t) + 0.1 * y.reshape(-1, 1, 1, 1)
    traces.clear()
    g = jax.jit(functools.partial(counted, cond, S, shape, method="dpm++_2m", num_steps=6))
    for scale, rescale in ((1.5, 0.0), (4.0, 0.7)):
        g(jax.random.key(0), guidance_scale=scale, guidance_rescale=rescale, cond=labels, null_cond=2)
    assert len(traces) == 1


def test_inpainting_and_sdedit_wrap_the_sigma_samplers():
    shape = (64, 4, 4, 1)
    known = jnp.full(shape, -0.8)
    mask = jnp.zeros(shape).at[:, :2].set(1.0)
    x = sampler("dpm++_2m", 10, shape)(jax.random.key(5), known=known, mask=mask)
    np.testing.assert_array_equal(np.asarray(x)[:, :2], np.float32(-0.8))
    assert_gaussian(np.asarray(x)[:, 2:], bias=0.05)
    # SDEdit: 0.9 noised to the first grid level at or below t = 100, then the flow of Gaussian
    # data: x(0) - MU = (x(sigma) - MU) SIGMA / sqrt(SIGMA^2 + sigma^2), on average over the noise.
    start = jnp.full(shape, 0.9)
    x = sampler("heun", 40, shape, start_step=100)(jax.random.key(6), start_x=start)
    sigma = float(sampling_grid(S, "heun", 40, start_step=100).steps["sigma"][0])
    assert 0.2 < sigma < 0.41  # sigma at t = 100 is 0.41
    expected = MU + (0.9 - MU) * SIGMA / np.sqrt(SIGMA**2 + sigma**2)
    assert abs(float(x.mean()) - expected) < 5 * float(x.std()) / np.sqrt(x.size) + 0.005


# ---------------------------------------------------------------------------- against diffusers
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=T)
SCHEDULERS = {
    "euler": lambda: diffusers.EulerDiscreteScheduler(use_karras_sigmas=True, **LINEAR),
    "heun": lambda: diffusers.HeunDiscreteScheduler(use_karras_sigmas=True, **LINEAR),
    "euler_ancestral": lambda: diffusers.EulerAncestralDiscreteScheduler(**LINEAR),
    "dpm++_2m": lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
                                                              use_karras_sigmas=True, **LINEAR),
    "dpm++_2m_sde": lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                                  use_karras_sigmas=True, **LINEAR),
}
OPTIONS = {"euler_ancestral": {"sigmas": "model"}}


def toy_model(x, t):
    """A fixed smooth 'model output' f(model input, timestep), the same in torch and JAX."""
    return 0.8 * np.tanh(x) + 0.1 * np.cos(x * 3.0) + 2e-4 * t


@pytest.mark.parametrize("method", SIGMA_SAMPLERS)
def test_every_step_agrees_with_diffusers(method, monkeypatch):
    K, shape = 10, (2, 4, 4, 3)
    sched = SCHEDULERS[method]()
    sched.set_timesteps(K)
    grid = sampling_grid(S, method, K, **OPTIONS.get(method, {}))
    their_sigmas = sched.sigmas.numpy()  # Heun's lists repeat each inner sigma and timestep twice
    their_sigmas = np.append(their_sigmas[:-1:2], 0.0) if method == "heun" else their_sigmas
    # The grids agree to diffusers' float32 cumulative product of the alphas (ours is float64).
    np.testing.assert_allclose(np.append(grid.steps["sigma"], 0.0), their_sigmas, rtol=1e-4)
    their_t = sched.timesteps.numpy()[:: 2 if method == "heun" else 1]
    # diffusers' DPM-Solver rounds its timesteps to integers; the others keep them fractional.
    dpm = method.startswith("dpm++")
    np.testing.assert_allclose(grid.model_t, their_t, atol=0.5 if dpm else 1e-2)
    time_dependent = not dpm  # so the rounding above cannot matter

    rng = np.random.default_rng(0)
    noises = rng.standard_normal((K, *shape)).astype(np.float32)
    latents = rng.standard_normal(shape).astype(np.float32) * float(sched.init_noise_sigma)
    # diffusers' state is x = x0 + sigma eps (DPM-Solver: the variance-preserving x_t).
    ve = not dpm
    calls = iter(noises)
    for module in (diffusers.schedulers.scheduling_euler_ancestral_discrete,
                   diffusers.schedulers.scheduling_dpmsolver_multistep):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(calls)).permute(0, 3, 1, 2))
    x, theirs = torch.from_numpy(latents).permute(0, 3, 1, 2), []
    for t in sched.timesteps:
        if getattr(sched, "state_in_first_order", True):
            theirs.append(x.permute(0, 2, 3, 1).numpy().copy())
        model_in = sched.scale_model_input(x, t).permute(0, 2, 3, 1).numpy()
        out = toy_model(model_in, float(t) if time_dependent else 0.0).astype(np.float32)
        x = sched.step(torch.from_numpy(out).permute(0, 3, 1, 2), t, x).prev_sample
    theirs.append(x.permute(0, 2, 3, 1).numpy())

    def model(x, t):
        return 0.8 * jnp.tanh(x) + 0.1 * jnp.cos(x * 3.0) + 2e-4 * time_dependent * t[:, None, None, None]

    # Our chain, one step at a time through the sampler's own step function, with diffusers'
    # sigmas and timesteps, model outputs and noise: identical inputs, so only the arithmetic differs.
    sigma_all = their_sigmas.astype(np.float32)
    steps = {"sigma": sigma_all[:-1], "sigma_next": sigma_all[1:], "t": their_t.astype(np.float32),
             "t_next": np.append(their_t[1:], 0.0).astype(np.float32)}
    x_cur = jnp.asarray(latents / (np.sqrt(sigma_all[0] ** 2 + 1) if ve else 1.0))
    s = get_sampler(method)
    state, xs = s.init_state(x_cur), [np.asarray(x_cur)]
    for i in range(K):
        ctx = StepContext(model, S, "eps", "fixed_small", False, K, lambda key, i=i: jnp.asarray(noises[i]),
                          {k: jnp.float32(v.default) for k, v in s.step_options.items()})
        inputs = dict({k: jnp.asarray(v[i]) for k, v in steps.items()}, i=jnp.int32(i))
        x_cur, state, _ = s.step(ctx, x_cur, state, inputs, jax.random.key(i))
        xs.append(np.asarray(x_cur))
    for i, (ours, their) in enumerate(zip(xs, theirs)):
        if ve:
            ours = ours * np.sqrt(sigma_all[i] ** 2 + 1)
        scale = max(1.0, float(np.abs(their).max()))
        np.testing.assert_allclose(ours, their, rtol=1e-4, atol=2e-5 * scale, err_msg=f"{method} step {i}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 999])
def test_timestep_spacing_equals_diffusers(spacing, steps):
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, **LINEAR)
    ddim.set_timesteps(steps)
    expected = ddim.timesteps.numpy()
    if spacing == "linspace" and steps == 1:
        expected = [T - 1]  # one step from pure noise starts at T - 1 (diffusers' linspace: t = 0)
    np.testing.assert_array_equal(spaced_timesteps(T, steps, spacing)[::-1], expected)
    grid = sampling_grid(S, "ddim", steps, spacing=spacing)
    np.testing.assert_array_equal(grid.model_t, expected)


def test_zero_terminal_snr_betas_equal_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs

    for name, betas in (("linear", np.linspace(1e-4, 0.02, T)),
                        ("scaled_linear", np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2)):
        ours = rescale_zero_terminal_snr(betas)
        expected = theirs(torch.tensor(betas, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15, err_msg=name)
        assert ours[-1] == 1.0


def test_guidance_rescale_equals_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    rng = np.random.default_rng(1)
    cond, uncond = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    model = lambda x, t, y: jnp.concatenate([cond, uncond])  # the conditional half, then the null half
    guided = dj.samplers.guided_denoise_fn(model, cond=jnp.zeros(3, int), null_cond=1,
                                           guidance_scale=5.0, guidance_rescale=0.7)
    ours = guided(jnp.zeros((3, 4, 4, 2)), jnp.zeros(3))
    cfg = uncond + 5.0 * (cond - uncond)
    expected = rescale_noise_cfg(torch.from_numpy(cfg).permute(0, 3, 1, 2),
                                 torch.from_numpy(cond).permute(0, 3, 1, 2), 0.7).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
