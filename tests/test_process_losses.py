"""The one training loss, of every process and prediction, on Gaussian data with the exact model:
the loss of the model that outputs E[target | x_t] equals the closed form E_t[w(t) c(t)^2
Var(x0 | x_t)] (computed here in float64 by quadrature over the time distribution, from the
processes' formulas written out again) within 4 standard errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from tests.oracles import gaussian_exact_process_model, process_coefficients64
from diffusion_jax.errors import UsageError
from diffusion_jax.losses import loss_weight, sample_times, training_loss
from diffusion_jax.processes import as_process, make_process
from diffusion_jax.processes.targets import levels

MU, S, BATCH, DIM = 0.3, 0.5, 16384, 4
MARGIN = 1e-5


def times_and_weights(name, time_sampling, shift=1.0):
    """Quadrature nodes t and weights (summing to 1) of the time distribution."""
    if time_sampling in ("logit_normal", "lognormal"):
        z, w = np.polynomial.hermite_e.hermegauss(160)
        w = w / w.sum()
        if time_sampling == "lognormal":  # sigma / alpha, as a time
            s = np.exp(-1.2 + 1.2 * z)
            if name == "vp":
                return (np.sqrt(0.05 ** 2 + 4 * 0.25 * 19.9 * 0.5 * np.log1p(s * s)) - 0.05) / (2 * 0.25 * 19.9), w
            return (s / (1 + s) if name == "flow" else s), w
        u = 1 / (1 + np.exp(-z))
    else:
        x, w = np.polynomial.legendre.leggauss(1000)
        v, w = (x + 1) / 2, w / 2
        u = v if time_sampling == "uniform" else 1 - v - 1.29 * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
    u = np.clip(u, MARGIN, 1 - MARGIN)
    if name == "edm":
        return (0.002 + u * (80 - 0.002)) if time_sampling != "lognormal" else u, w
    if name == "flow" and shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return u, w


def closed_form(name, prediction, time_sampling, weighting, shift=1.0):
    t, w = times_and_weights(name, time_sampling, shift)
    a, s, da, ds = process_coefficients64(name, t)
    variance = S ** 2 * s ** 2 / (a ** 2 * S ** 2 + s ** 2)  # Var(x0 | x_t) per dimension
    c2 = {"eps": a ** 2 / s ** 2, "x0": np.ones_like(t), "v": (a ** 2 + s ** 2) ** 2 / s ** 2,
          "velocity": (da - ds * a / s) ** 2}[prediction]
    snr = a ** 2 / s ** 2
    on_x0 = {"none": c2, "min_snr": np.minimum(snr, 5.0), "p2": snr / (1 + snr),
             "edm": (s ** 2 + 0.25) / (s * 0.5) ** 2, "cosmap": c2 * 2 / (np.pi * (1 - 2 * s + 2 * s ** 2))}[weighting]
    return float(np.sum(w * on_x0 * variance))


CASES = [  # process, prediction, time sampling, weighting (every process x prediction)
    ("vp", "eps", "uniform", "none"), ("vp", "x0", "uniform", "p2"), ("vp", "v", "logit_normal", "min_snr"),
    ("vp", "velocity", "uniform", "none"), ("flow", "x0", "lognormal", "none"),
    ("edm", "eps", "lognormal", "none"), ("edm", "x0", "lognormal", "edm"), ("edm", "v", "uniform", "none"),
    ("edm", "velocity", "lognormal", "min_snr"),
    ("flow", "eps", "uniform", "none"), ("flow", "x0", "mode", "none"), ("flow", "v", "logit_normal", "p2"),
    ("flow", "velocity", "logit_normal", "none"), ("flow", "velocity", "uniform", "cosmap"),
]


@pytest.mark.parametrize("name,prediction,time_sampling,weighting", CASES)
def test_the_loss_of_the_exact_model_is_its_closed_form(name, prediction, time_sampling, weighting):
    process = make_process(name)
    x0 = MU + S * draws.normal(jax.random.key(0), (BATCH, DIM))
    loss = jax.jit(lambda x0, key: training_loss(gaussian_exact_process_model(process, prediction, MU, S), process, x0, key,
                                                 prediction=prediction, weighting=weighting,
                                                 time_sampling=time_sampling))
    mean, aux = loss(x0, jax.random.key(1))
    per_example = np.asarray(aux["loss"], np.float64)
    error = per_example.std() / np.sqrt(BATCH)
    expected = closed_form(name, prediction, time_sampling, weighting)
    assert abs(float(mean) - expected) < 4 * error, (float(mean), expected, error)


def test_the_shifted_flow_samples_shifted_times():
    process = make_process("flow", shift=3.0)
    t = np.asarray(sample_times(process, jax.random.key(2), 200_000, "uniform"), np.float64)
    nodes, w = times_and_weights("flow", "uniform", shift=3.0)
    assert abs(t.mean() - np.sum(w * nodes)) < 4 * t.std() / np.sqrt(t.size)
    assert abs(np.median(t) - 0.75) < 0.005  # shift 3 moves the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_ddpm_loss_of_the_exact_model_is_its_closed_form(prediction):
    schedule = dj.make_schedule("linear", 1000)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    variance = S ** 2 * s ** 2 / (a ** 2 * S ** 2 + s ** 2)
    c2 = {"eps": a ** 2 / s ** 2, "x0": np.ones(1000), "v": 1 / s ** 2}[prediction]
    expected = float(np.mean(c2 * variance))
    model = gaussian_exact_process_model(as_process(schedule), prediction, MU, S)
    x0 = MU + S * draws.normal(jax.random.key(3), (BATCH, DIM))
    mean, aux = jax.jit(lambda x0, k: training_loss(model, schedule, x0, k, prediction=prediction))(x0, jax.random.key(4))
    assert aux["t"].dtype == jnp.int32  # DDPM's uniform times: its integer steps
    error = np.asarray(aux["loss"], np.float64).std() / np.sqrt(BATCH)
    assert abs(float(mean) - expected) < 4 * error, (float(mean), expected, error)


def test_what_the_loss_refuses():
    process = make_process("flow")
    x0 = jnp.zeros((4, 2))
    model = lambda x, t: x
    for kwargs, words in (({"variance": "learned_range"}, "discrete posterior"),
                          ({"weighting": "edm"}, "needs the data's sigma_data"),
                          ({"time_sampling": "logit_normal", "time_sampling_options": {"scale": 1.0}}, "takes \\['mean', 'std'\\]"),
                          ({"time_sampling": "logit_normal", "time_sampling_options": {"std": 0.0}}, "std = 0.0 must be"),
                          ({"time_sampling": "mode", "time_sampling_options": {"scale": 50.0}}, "scale = 50.0 must be"),
                          ({"time_sampling": "bogus"}, "unknown time_sampling")):
        with pytest.raises(UsageError, match=words):
            training_loss(model, process, x0, jax.random.key(0), **kwargs)
    with pytest.raises(UsageError, match="velocity target needs a continuous time"):
        training_loss(model, dj.make_schedule("linear", 100), x0, jax.random.key(0), prediction="velocity")
    t = jnp.array([0.25, 0.5])
    w = loss_weight(process, levels(process, t, t, derivatives=True), "velocity", "sigma_sqrt")
    np.testing.assert_allclose(w, [16.0, 4.0], rtol=1e-6)
