"""A condition kind defined here, in the test, and nowhere in the library: the scalar brightness
of an image (its mean pixel in [-1, 1]). Registered with `register_kind` and named by
data.condition = "tests.test_condition_kinds:brightness", it trains, samples with guidance and
runs a generate job through the library's own code, unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.conditions import ConditionKind, register_kind
from diffusion_jax.errors import UsageError
from diffusion_jax.viz import to_model_range
from tests.train_helpers import tiny_config

pytestmark = pytest.mark.slow  # the full tier: it trains a run


class Brightness(ConditionKind):
    """y = (brightness, 1) [B, 2] through the backbone's condition vector; the null is (0, 0)."""

    name = "tests.test_condition_kinds:brightness"
    description = "brightness-conditioned (tests.test_condition_kinds)"
    how_to_give = "give --condition B, a mean pixel in [-1, 1]"

    def model_fields(self, config):
        return {"cond_dim": 2}

    def training_conditions(self, config, data):
        return self.encode_values(to_model_range(data.images).mean(axis=(1, 2, 3))), None

    def values(self, config, given):
        values = np.asarray([float(v) for v in given], np.float32)
        if np.any(np.abs(values) > 1):
            raise UsageError(f"brightness {values.tolist()} is outside [-1, 1]")
        return values

    def default_values(self, config):
        return np.float32([-0.6])

    @staticmethod
    def encode_values(values):
        values = np.asarray(values, np.float32)
        return np.stack([values, np.ones_like(values)], axis=1)

    def encoder(self, config):
        return lambda values: jnp.asarray(self.encode_values(values))

    def null(self, config, negative=None):
        return np.zeros((1, 2), np.float32)


register_kind(Brightness())

DARK, BRIGHT = -0.75, -0.35  # the digits' mean pixels span about [-0.85, -0.3]


def test_a_kind_defined_in_a_test_trains_samples_with_guidance_and_generates(tmp_path):
    from diffusion_jax.conditions import condition_kind
    from diffusion_jax.generation import make_generator
    from diffusion_jax.jobs.generate import generate_samples
    from diffusion_jax.runs import load_run
    from diffusion_jax.training.loop import train

    config = tiny_config(300, **{"data.condition": Brightness.name, "data.batch_size": 64, "train.cond_dropout": 0.2,
                                 "train.ckpt_every": 300, "sample.method": "ddim", "sample.steps": 20})
    assert isinstance(condition_kind(config), Brightness)
    train(config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.ema_params["cond_embedder_0"]["kernel"].shape == (2, run.model.hidden)
    generate = make_generator(run.model, run.schedule, run.config, batch_size=128)
    key = jax.random.key(0)
    means = {(b, s): float(generate(run.ema_params, 128, key, conditions=[b], guidance_scale=s).mean())
             for b in (DARK, BRIGHT) for s in (1.0, 2.0)}
    # the model follows the condition (0.06 measured), and guidance (s = 2) pushes further along it (0.12)
    assert means[BRIGHT, 1.0] - means[DARK, 1.0] > 0.03, means
    assert means[BRIGHT, 2.0] - means[DARK, 2.0] > 1.5 * (means[BRIGHT, 1.0] - means[DARK, 1.0]), means
    with pytest.raises(UsageError, match="outside"):
        generate(run.ema_params, 4, key, conditions=[2.0])
    with pytest.raises(UsageError, match="brightness-conditioned .*, not class-conditional"):
        generate(run.ema_params, 4, key, labels=[1])

    manifest = generate_samples(tmp_path / "run", tmp_path / "job", 6, conditions=[DARK, BRIGHT], guidance_scale=2.0,
                                batch_size=4, shard_size=3, progress=False)
    assert manifest["conditions"] == [str(DARK), str(BRIGHT)]
    images = np.concatenate([np.load(tmp_path / "job" / shard["file"])["images"] for shard in manifest["shards"]])
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
