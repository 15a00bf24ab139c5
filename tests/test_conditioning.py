"""Class conditioning: the null-label fraction a model sees in training is the configured one,
and guidance follows diffusers' convention (1 = conditional, no guidance; the default)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.builders import build_model, build_schedule
from diffusion_jax.evaluation.report import render_report
from diffusion_jax.conditions import describe_guidance
from diffusion_jax.generation import batch_program, make_generator
from diffusion_jax.samplers import guided_denoise_fn, sample
from diffusion_jax.optim import make_optimizer
from diffusion_jax.training.state import make_init_fn
from diffusion_jax.training.step import make_train_step
from tests.train_helpers import tiny_config


pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

@pytest.mark.parametrize("cond_dropout", [0.0, 0.1])
def test_the_model_sees_the_configured_fraction_of_null_labels(cond_dropout):
    """Labels reach the label embedding of a DiT (intercepted there, inside the module) with
    exactly `train.cond_dropout` of them null: dropped once, by the train step."""
    batch, classes = 512, 10  # 4 standard errors: 0.053 at dropout 0.1 (dropping twice would give 0.19)
    config = tiny_config(1, **{"data.use_labels": True, "data.num_classes": classes,
                               "data.batch_size": batch, "train.cond_dropout": cond_dropout})
    model, schedule = build_model(config), build_schedule(config)
    optimizer = make_optimizer(config.optim, 1)
    state = jax.jit(make_init_fn(model, optimizer, (8, 8, 1), 0))(jax.random.PRNGKey(0))
    step = make_train_step(model, schedule, config, optimizer)
    labels = np.arange(batch, dtype=np.int32) % classes
    images = np.zeros((batch, 8, 8, 1), np.float32)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
            jax.debug.callback(lambda a: seen.append(np.asarray(a)), args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.block_until_ready(jax.jit(step)(state, {"image": images, "cond": labels}))
    jax.effects_barrier()
    assert len(seen) == 1 and seen[0].shape == (batch,)
    null = seen[0] == classes
    assert np.array_equal(seen[0][~null], labels[~null])  # kept labels are unchanged
    stderr = np.sqrt(max(cond_dropout * (1 - cond_dropout), 1e-12) / batch)
    assert abs(null.mean() - cond_dropout) <= 4 * stderr, null.mean()


MEANS = jnp.array([-0.5, 0.5, 0.0])  # class 0, class 1, and the null label 2
SCHEDULE = dj.make_schedule("linear", 1000)


def class_oracle(x, t, y, sigma=0.5):
    """The optimal eps of Gaussian data N(MEANS[y], sigma^2) per class (t = model timestep)."""
    a = SCHEDULE.alphas_cumprod[jnp.round(t).astype(jnp.int32)].reshape(-1, 1, 1, 1)
    mu = MEANS[y].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) / (a * sigma**2 + 1 - a) * (x - jnp.sqrt(a) * mu)


class OracleModel:
    """A 'model' whose apply is the class oracle, so the generator runs without a network."""
    num_classes = 2

    def apply(self, variables, x, t, y=None):
        return class_oracle(x, t, jnp.full(x.shape[:1], 2) if y is None else y)


def labelled_config():
    return tiny_config(1, **{"data.use_labels": True, "data.num_classes": 2, "data.image_size": 2,
                             "diffusion.num_timesteps": 1000, "sample.method": "ddim", "sample.steps": 20,
                             "sample.clip_x0": False})


def test_a_labelled_run_samples_conditionally_by_default_and_says_no_guidance():
    config, model = labelled_config(), OracleModel()
    generate = make_generator(model, SCHEDULE, config, batch_size=32)
    key = jax.random.key(0)
    labels = jnp.arange(32) % 2
    direct = lambda *guidance, cond=labels: sample(guided_denoise_fn(class_oracle, cond, *guidance), SCHEDULE,
                                                   (32, 2, 2, 1), jax.random.fold_in(key, 0), method="ddim",
                                                   num_steps=20, clip_x0=False)
    conditional, unconditional = direct(), direct(cond=jnp.full(32, 2))
    by_default = generate(None, 32, key)  # never set sample.guidance_scale
    np.testing.assert_allclose(by_default, conditional, atol=1e-5)
    assert np.abs(by_default - np.asarray(unconditional)).max() > 0.1
    np.testing.assert_allclose(generate(None, 32, key, guidance_scale=0.0), unconditional, atol=1e-5)
    guided = generate(None, 32, key, guidance_scale=3.0)
    np.testing.assert_allclose(guided, direct(2, 3.0), atol=1e-5)
    # a generator made again with the same settings runs the same program (nothing traced again)
    built = batch_program.cache_info().misses
    np.testing.assert_array_equal(make_generator(model, SCHEDULE, labelled_config(), batch_size=32)(
        None, 32, key, guidance_scale=3.0), guided)
    assert batch_program.cache_info().misses == built
    make_generator(model, SCHEDULE, labelled_config(), batch_size=32, steps=10)
    assert batch_program.cache_info().misses == built + 1
    assert describe_guidance(config, config.sample.guidance_scale) == "no guidance (conditional model, scale 1)"
    assert describe_guidance(config, 3.0) == "classifier-free guidance scale 3"
    unconditional_run = tiny_config(1)
    assert describe_guidance(unconditional_run, 1.0) == "no guidance (unconditional model)"
    with pytest.raises(ValueError, match="this run is unconditional"):
        make_generator(OracleModel(), SCHEDULE, unconditional_run, batch_size=8)(None, 8, key, guidance_scale=5.0)


def test_the_report_says_no_guidance_where_there_is_none():
    row = {"t_min": 0, "t_max": 99, "count": 0}
    metrics = {"checkpoint_step": 1, "workdir": "w", "seed": 0, "num_examples": 1, "noise_mse": 0.1,
               "noise_rmse": 0.3, "noise_mae": 0.2, "noise_r2": 0.9, "per_timestep": [row],
               "sampler": {"method": "ddim", "steps": 5, "eta": 0.0, "num_samples": 4, "guidance_scale": 1.0,
                           "guidance": describe_guidance(tiny_config(1), 1.0)}}
    text = render_report(metrics)
    assert "no guidance (unconditional model)" in text and "guidance scale 1" not in text
