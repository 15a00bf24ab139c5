"""The samplers against the reference steppers, state by state, from the same x_T, model outputs
and noise: diffusers' DDPM, DDIM, Euler, Heun, Euler ancestral, DPM-Solver multistep (2M and SDE)
and UniPC schedulers on DDPM grids (each run through `pipeline_sampler`, the mapping pipelines
use), NVlabs/edm's `edm_sampler` (with and without churn) and FlowMatchEulerDiscreteScheduler."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from diffusion_jax.interop.scheduler import pipeline_sampler, process_from_scheduler, settings_from_scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

K, SHAPE = 10, (2, 4, 4, 3)
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
SCHEDULERS = {
    "DDPMScheduler": dict(LINEAR, clip_sample=False),
    "DDIMScheduler": dict(LINEAR, clip_sample=False, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    "EulerDiscreteScheduler": dict(LINEAR, use_karras_sigmas=True),
    "HeunDiscreteScheduler": dict(LINEAR, use_karras_sigmas=True),
    "EulerAncestralDiscreteScheduler": dict(LINEAR, timestep_spacing="trailing"),
    "DPMSolverMultistepScheduler": dict(LINEAR),
    "DPMSolverMultistepScheduler-sde": dict(LINEAR, algorithm_type="sde-dpmsolver++", timestep_spacing="leading",
                                            steps_offset=1),
    "UniPCMultistepScheduler": dict(LINEAR),
    "UniPCMultistepScheduler-karras": dict(LINEAR, timestep_spacing="trailing", prediction_type="v_prediction"),
}


def toy_model(x, t):
    """A fixed smooth 'model output' f(model input, timestep), the same in torch and JAX."""
    return 0.8 * np.tanh(x) + 0.1 * np.cos(x * 3.0) + 2e-4 * np.asarray(t, np.float32).reshape(-1, 1, 1, 1)


def jax_toy_model(x, t):
    return 0.8 * jnp.tanh(x) + 0.1 * jnp.cos(x * 3.0) + 2e-4 * t.reshape(-1, 1, 1, 1)


def our_noises(key, steps, shape):
    key_steps = jax.random.split(key)[1]
    return [np.asarray(draws.normal(jax.random.split(jax.random.fold_in(key_steps, i))[0], shape))
            for i in range(steps)]


@pytest.mark.parametrize("which", sorted(SCHEDULERS))
def test_each_sampler_is_the_diffusers_scheduler_state_by_state(which, monkeypatch):
    name = which.split("-")[0]
    sched = getattr(diffusers, name)(**SCHEDULERS[which])
    sched.set_timesteps(K)
    config = {**dict(sched.config), "_class_name": name}
    if name == "HeunDiscreteScheduler":
        method, options, clip_x0 = "heun", {"sigmas": "karras"}, False  # no pipeline names it here
    else:
        method, options, clip_x0 = pipeline_sampler(config)
    prediction = settings_from_scheduler(config, False)["diffusion"]["prediction"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(SHAPE).astype(np.float32) * float(sched.init_noise_sigma)
    noises = iter(our_noises(jax.random.key(5), K, SHAPE))
    for module in ("scheduling_ddpm", "scheduling_euler_ancestral_discrete", "scheduling_dpmsolver_multistep"):
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "randn_tensor",
                            lambda *a, **k: torch.from_numpy(next(noises)).permute(0, 3, 1, 2))
    x, theirs = torch.from_numpy(latents).permute(0, 3, 1, 2), []
    for t in sched.timesteps:
        if getattr(sched, "state_in_first_order", True):
            theirs.append(x.permute(0, 2, 3, 1).numpy().copy())
        model_in = sched.scale_model_input(x, t).permute(0, 2, 3, 1).numpy()
        out = toy_model(model_in, np.full(SHAPE[0], float(t)))
        x = sched.step(torch.from_numpy(out).permute(0, 3, 1, 2), t, x).prev_sample
    theirs.append(x.permute(0, 2, 3, 1).numpy())

    process = dj.as_process(process_from_scheduler(config))
    grid = dj.sampling_grid(process, method, K, **options)
    ve = name.startswith(("Euler", "Heun"))  # their state is x / alpha
    x_T = latents / (np.sqrt(1 + (grid.sigma[0] / grid.alpha[0]) ** 2) if ve else 1.0)
    _, trajectory = jax.jit(functools.partial(dj.sample, jax_toy_model, process, SHAPE, method=method, num_steps=K,
                                              prediction=prediction, clip_x0=clip_x0, trajectory_every=1,
                                              **options))(jax.random.key(5), x_T=x_T)
    ours = np.asarray(trajectory["x_t"]) / (np.asarray(grid.alpha).reshape(-1, 1, 1, 1, 1) if ve else 1.0)
    # the same model times (Karras' fractional ones to diffusers' float32 interpolation of log sigma)
    np.testing.assert_allclose(trajectory["t"][:-1], [float(t) for t in sched.timesteps][:: 2 if method == "heun" else 1],
                               atol=1e-2)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=f"{which} state {i}")


def nvlabs_edm_sampler(net, latents, noises, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                       S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """NVlabs/edm generate.py's edm_sampler, with randn_like replaced by the given noises."""
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
def test_heun_on_edm_is_nvlabs_edm_sampler(churn):
    steps = 18
    latents = np.random.default_rng(1).standard_normal(SHAPE)
    noises = our_noises(jax.random.key(2), steps, SHAPE)

    def denoiser_np(x, sigma):  # any D(x; sigma): a stand-in for the network
        return np.tanh(x / np.sqrt(sigma ** 2 + 0.25)) * 0.9 + 0.01 * np.log(sigma)

    net = lambda x, sigma: torch.from_numpy(denoiser_np(x.numpy(), float(sigma)))
    theirs = [s.numpy() for s in nvlabs_edm_sampler(net, torch.from_numpy(latents),
                                                     [torch.from_numpy(n.astype(np.float64)) for n in noises],
                                                     num_steps=steps, **churn)]
    model = lambda x, sigma: jnp.tanh(x / jnp.sqrt(sigma[:, None, None, None] ** 2 + 0.25)) * 0.9 + \
        0.01 * jnp.log(sigma)[:, None, None, None]
    options = {"s_churn": churn.get("S_churn", 0.0), "s_tmin": churn.get("S_min", 0.0),
               "s_tmax": churn.get("S_max", float("inf")), "s_noise": churn.get("S_noise", 1.0)}
    _, trajectory = dj.sample(model, dj.make_process("edm"), SHAPE, jax.random.key(2), method="heun", num_steps=steps,
                              prediction="x0", clip_x0=False, x_T=(latents * 80.0).astype(np.float32),
                              trajectory_every=1, **options)
    for i, (a, b) in enumerate(zip(np.asarray(trajectory["x_t"]), theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=f"step {i}")


@pytest.mark.parametrize("options,mu", [({}, None), ({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.7)])
def test_euler_on_flow_is_diffusers_flow_match_euler(options, mu):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    scheduler.set_timesteps(12, mu=mu)
    x_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    x, theirs = torch.from_numpy(x_T).permute(0, 3, 1, 2), [x_T]
    for t in scheduler.timesteps:
        out = toy_model(x.permute(0, 2, 3, 1).numpy(), np.full(SHAPE[0], float(t)))
        x = scheduler.step(torch.from_numpy(out).permute(0, 3, 1, 2), t, x).prev_sample
        theirs.append(x.permute(0, 2, 3, 1).numpy())
    _, trajectory = dj.sample(jax_toy_model, dj.make_process("flow", mu=mu, **options), SHAPE, jax.random.key(0),
                              method="euler", num_steps=12, prediction="velocity", clip_x0=False, x_T=x_T,
                              trajectory_every=1)
    for i, (a, b) in enumerate(zip(np.asarray(trajectory["x_t"]), theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5 * (1 + np.abs(b).max()), err_msg=f"step {i}")
