"""The processes (ddpm, vp, edm, flow) against independent oracles: their marginals against float64
formulas and DDPM's own tables, their grids against diffusers' FlowMatchEulerDiscreteScheduler and
NVlabs/edm's sampler formula (in torch, float64), the target conversions against each other and
the velocity against finite differences of the path, and Gaussian moments by Monte Carlo."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from diffusion_jax.errors import UsageError
from diffusion_jax.processes import PREDICTIONS, as_process, from_prediction, make_process, process_names
from diffusion_jax.processes.targets import levels, prediction_target


def grid_of(process, steps):
    """A process's own grid and then its clean end, as diffusers and NVlabs/edm list them."""
    return np.append(process.own_grid(steps), 0.0)

CONTINUOUS = {"vp": make_process("vp"), "vp_cosine": make_process("vp", schedule="cosine"),
              "edm": make_process("edm"), "flow": make_process("flow"), "flow_shift3": make_process("flow", shift=3.0)}


def times(name, n=64, seed=0):
    """n times inside the process's range (EDM: sigmas log-uniform in [0.01, 50])."""
    u = np.random.default_rng(seed).uniform(0.02, 0.98, n)
    return np.exp(np.log(0.01) + u * (np.log(50.0) - np.log(0.01))) if name == "edm" else u


def test_the_registry_has_the_four_processes_and_refuses_bad_options():
    assert set(process_names()) == {"ddpm", "vp", "edm", "flow"}
    for bad, words in ((lambda: make_process("ve"), "unknown process 've'"),
                       (lambda: make_process("edm", sigma_max=-1.0), "sigma_max = -1.0"),
                       (lambda: make_process("edm", sigma_min=100.0), "must be below sigma_max"),
                       (lambda: make_process("vp", schedule="quadratic"), "schedule = 'quadratic'"),
                       (lambda: make_process("flow", shift=0.0), "shift = 0.0"),
                       (lambda: make_process("flow", bogus=1), "bogus"),
                       (lambda: make_process("flow", use_dynamic_shifting=True).own_grid(4), "give mu"),
                       (lambda: make_process("vp", beta_max=0.2), "keeps alpha = 0.9")):
        with pytest.raises(UsageError, match=words):
            bad()


def test_a_process_is_one_file_and_nothing_outside_branches_on_its_name():
    """The four members are four files in diffusion_jax/processes/, each registering itself; no
    module outside that package compares a process's name with a continuous member's (what
    differs between processes is asked of the process: its time mapping, whether t is sigma,
    ...). "ddpm" is read by name in one place, `builders.build_process`: its options live in the
    config's diffusion section itself, as in every run written before the other processes; and no
    module outside processes/ asks whether a process is DDPM (`ddpm_schedule`, `time_is_sigma`)."""
    import pathlib
    import re

    package = pathlib.Path(dj.__file__).parent
    for name in process_names():
        text = (package / "processes" / f"{name}.py").read_text()
        assert f'register("{name}"' in text, name
    names = "|".join(name for name in process_names() if name != "ddpm")
    branch = re.compile(rf"""(name|process)\b[^\n]{{0,40}}?(==|!=|\bin\b)\s*\(?["']({names})["']""")
    offenders = [f"{path.relative_to(package)}:{i}: {line.strip()}"
                 for path in package.rglob("*.py") if "processes" not in path.parts
                 for i, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not offenders, offenders
    asks = re.compile(r"ddpm_schedule|time_is_sigma|isinstance\([^)]*Schedule\)|\.continuous\(")
    offenders = [f"{path.relative_to(package)}:{i}: {line.strip()}"
                 for path in package.rglob("*.py") if "processes" not in path.parts and path.name != "likelihood.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if asks.search(line)]
    assert not offenders, offenders


def test_the_ddpm_process_is_the_schedule_bitwise():
    schedule = dj.make_schedule("cosine", 200)
    process = as_process(schedule)
    assert make_process("ddpm", schedule="cosine", num_timesteps=200).schedule.betas.tolist() == schedule.betas.tolist()
    key = jax.random.split(jax.random.key(0), 3)
    x0, eps = draws.normal(key[0], (16, 4, 4, 1)), draws.normal(key[1], (16, 4, 4, 1))
    t = jax.random.randint(key[2], (16,), 0, 200)
    alpha, sigma = process.marginal(t)
    ours = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    np.testing.assert_array_equal(ours, dj.q_sample(schedule, x0, t, eps))
    np.testing.assert_array_equal(process.model_time(t), schedule.timesteps[t])
    # it passes through jit as a pytree (the schedule its child)
    np.testing.assert_array_equal(jax.jit(lambda p, t: p.marginal(t)[0])(process, t), alpha)


def test_the_vp_marginals_equal_their_float64_formulas_and_the_discrete_limit():
    t = np.linspace(0.0, 1.0, 101)
    alpha, sigma = (np.asarray(a, np.float64) for a in make_process("vp").marginal(t))
    expected = np.exp(-0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    np.testing.assert_allclose(alpha, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, atol=2e-6)
    # score_sde's VP SDE is DDPM's linear schedule in the limit T -> inf: at T = 1000 the
    # discrete abar_{1000 t} agrees to ~1e-3 (betas (0.1 + 19.9 j / T) / T)
    betas = (0.1 + 19.9 * np.arange(1000) / 999.0) / 1000.0
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(alpha[1:] ** 2, abar[np.round(t[1:] * 1000).astype(int) - 1], atol=3e-3)
    s = 0.008
    alpha_c, sigma_c = (np.asarray(a, np.float64) for a in make_process("vp", schedule="cosine").marginal(t))
    expected = np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)
    np.testing.assert_allclose(alpha_c, np.clip(expected, 0, 1), atol=2e-6)
    assert alpha_c[-1] < 1e-15 and sigma_c[-1] == 1.0  # float64: cos(pi / 2)


def test_the_flow_grid_is_diffusers_flow_match_euler_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for options, mu in (({}, None), ({"shift": 3.0}, None),
                        ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.8)):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**options)
        for steps in (1, 4, 28):
            scheduler.set_timesteps(steps, mu=mu)
            ours = grid_of(make_process("flow", mu=mu, **options), steps)
            np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(make_process("flow").model_time(ours[:-1]) / 1000.0, ours[:-1], rtol=1e-6)


def test_the_edm_grid_is_nvlabs_edm_samplers():
    torch = pytest.importorskip("torch")
    process = make_process("edm")
    for steps in (2, 18, 35):  # edm_sampler's t_steps, float64, rounded by EDMPrecond (identity), then 0
        i = torch.arange(steps, dtype=torch.float64)
        t = (80.0 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        np.testing.assert_allclose(grid_of(process, steps), torch.cat([t, torch.zeros(1, dtype=torch.float64)]),
                                   rtol=1e-12)
    alpha, sigma = process.marginal(np.array([0.5, 80.0]))
    assert np.all(np.asarray(alpha) == 1.0) and np.asarray(sigma).tolist() == [0.5, 80.0]


@pytest.mark.parametrize("name", sorted(CONTINUOUS) + ["ddpm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_target_converts_back_to_the_data_and_the_noise(name, prediction):
    process = as_process(dj.make_schedule("linear", 1000)) if name == "ddpm" else CONTINUOUS[name]
    key = jax.random.split(jax.random.key(1), 2)
    x0, eps = draws.normal(key[0], (64, 3, 3, 2)), draws.normal(key[1], (64, 3, 3, 2))
    t = jnp.asarray(np.random.default_rng(0).integers(1, 999, 64)) if name == "ddpm" else jnp.asarray(times(name), jnp.float32)
    if name == "ddpm" and prediction == "velocity":
        with pytest.raises(UsageError, match="continuous time"):
            levels(process, t, x0, derivatives=True)
        return
    alpha, sigma = process.marginal(t)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    lv = levels(process, t, x0, derivatives=prediction == "velocity")
    out = prediction_target(prediction, lv, x0, eps)
    x0_back, eps_back = from_prediction(prediction, lv, x_t, out)
    scale = 1.0 + np.abs(np.asarray(sigma))[:, None, None, None]  # EDM's x_t grows with sigma
    np.testing.assert_allclose(np.asarray(x0_back) / scale, np.asarray(x0) / scale, atol=2e-5)
    np.testing.assert_allclose(np.asarray(eps_back) * np.asarray(alpha)[:, None, None, None] / scale,
                               np.asarray(eps) * np.asarray(alpha)[:, None, None, None] / scale, atol=2e-5)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_the_velocity_is_the_time_derivative_of_the_path(name):
    """Central differences, in float64, of x_t = alpha(t) x0 + sigma(t) eps (alpha and sigma
    from their float64 formulas, not the code under test); for flow exactly eps - x0."""
    process = CONTINUOUS[name]
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((8, 5)), rng.standard_normal((8, 5))
    t = times(name, 8, seed=3)

    def path(t):
        t = t[:, None]
        if name.startswith("flow"):
            return (1 - t) * x0 + t * eps  # the shift moves the grid, not the path
        if name == "edm":
            return x0 + t * eps
        if name == "vp":
            a = np.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t)
        else:
            a = np.cos((t + 0.008) / 1.008 * np.pi / 2) / np.cos(0.008 / 1.008 * np.pi / 2)
        return a * x0 + np.sqrt(1 - a ** 2) * eps

    h = 1e-6 * np.maximum(t, 1.0)
    numerical = (path(t + h) - path(t - h)) / (2 * h[:, None])
    lv = levels(process, jnp.asarray(t, jnp.float32), x0, derivatives=True)
    ours = np.asarray(prediction_target("velocity", lv, x0, eps), np.float64)
    np.testing.assert_allclose(ours, numerical, rtol=2e-4, atol=2e-4 * (1 + np.abs(numerical).max()))
    if name.startswith("flow"):
        np.testing.assert_allclose(ours, eps - x0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_noisy_gaussian_data_has_the_marginal_moments(name):
    """x0 ~ N(mu, s^2), x_t = alpha x0 + sigma eps ~ N(alpha mu, alpha^2 s^2 + sigma^2), by Monte Carlo
    at one time of each process (n = 400,000: 5 standard errors)."""
    process, mu, s, n = CONTINUOUS[name], 0.3, 0.5, 400_000
    t = 2.0 if name == "edm" else 0.6
    alpha, sigma = (float(v) for v in process.marginal(np.float32(t)))
    key = jax.random.split(jax.random.key(4), 2)
    x = alpha * (mu + s * draws.normal(key[0], (n,))) + sigma * draws.normal(key[1], (n,))
    std = np.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)
    assert abs(float(x.mean()) - alpha * mu) < 5 * std / np.sqrt(n)
    assert abs(float(x.std()) - std) < 5 * std / np.sqrt(2 * n)


def test_edm_preconditioning_is_nvlabs_edmprecond_around_any_backbone():
    """NVlabs/edm's EDMPrecond.forward, written in torch float64 with the same toy backbone F."""
    torch = pytest.importorskip("torch")
    from diffusion_jax.processes.edm import precondition
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 4, 3)).astype(np.float32) * 10
    sigma = np.exp(rng.uniform(np.log(0.002), np.log(80.0), 6)).astype(np.float32)
    weights = rng.standard_normal(3).astype(np.float32)

    def backbone(x_in, c_noise):  # any function of (input, noise level): a stand-in for a U-Net or DiT
        return jnp.tanh(x_in * weights) + c_noise[:, None, None, None]

    ours = np.asarray(jax.jit(precondition(backbone, sigma_data=0.5))(x, sigma))
    xt, st, sd = torch.tensor(x, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1), 0.5
    c_skip = sd ** 2 / (st ** 2 + sd ** 2)
    c_out = st * sd / (st ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + st ** 2).sqrt()
    c_noise = st.log() / 4
    f = torch.tanh(c_in * xt * torch.tensor(weights, dtype=torch.float64)) + c_noise
    theirs = (c_skip * xt + c_out * f).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("options", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.4,
                                                        "max_shift": 1.2}])
def test_a_flow_scheduler_config_imports_as_the_flow_process_and_exports_back(options, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusion_jax.interop.scheduler import flow_process_options, flow_scheduler_config
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**options)
    theirs.save_config(tmp_path)
    import json
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    mu = 0.9 if options.get("use_dynamic_shifting") else None
    process = make_process("flow", mu=mu, **flow_process_options(config))
    theirs.set_timesteps(10, mu=mu)
    np.testing.assert_allclose(grid_of(process, 10), theirs.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler_config(process))
    back.set_timesteps(10, mu=mu)
    np.testing.assert_array_equal(back.sigmas.numpy(), theirs.sigmas.numpy())
    for field, value in (("use_karras_sigmas", True), ("invert_sigmas", True), ("shift", "3")):
        with pytest.raises(UsageError, match=field):
            flow_process_options({**config, field: value})
