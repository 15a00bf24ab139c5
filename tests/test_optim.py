"""The optimiser of a config: its clipping and skipping are optax's, with optax's state tree."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.config import base_config
from diffusion_jax.optim import OPTIMIZERS, learning_rate_schedule, make_optimizer


@pytest.mark.parametrize("grad_clip,skip_nonfinite,accumulate_steps",
                         [(0.5, True, 1), (100.0, True, 1), (0.5, False, 1), (0.0, True, 1), (0.5, True, 2)])
def test_clipping_and_skipping_are_optaxs_with_its_state_tree(grad_clip, skip_nonfinite, accumulate_steps):
    """make_optimizer's one-norm clipping and skipping equal optax.apply_if_finite(optax.chain(
    optax.clip_by_global_norm(c), the optimiser)) (the composition earlier versions built) update by update,
    through clipped, unclipped, NaN and infinite gradients; the state trees have the same structure,
    so the checkpoints of earlier versions restore."""
    config = base_config().optim
    config.grad_clip, config.skip_nonfinite, config.accumulate_steps = grad_clip, skip_nonfinite, accumulate_steps
    config.warmup_steps, config.learning_rate = 0, 0.1
    ours = make_optimizer(config, 10)
    reference = OPTIMIZERS[config.optimizer](config, learning_rate_schedule(config, 10))  # the config's own
    if grad_clip > 0:
        reference = optax.chain(optax.clip_by_global_norm(grad_clip), reference)
    if skip_nonfinite:
        reference = optax.apply_if_finite(reference, max_consecutive_errors=1_000_000)
    if accumulate_steps > 1:
        reference = optax.MultiSteps(reference, every_k_schedule=accumulate_steps)
    params = {"a": jnp.ones((3, 2)), "b": {"c": jnp.arange(4.0)}}
    state, expected_state = ours.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    rng = np.random.default_rng(0)
    step, expected_step = jax.jit(ours.update), jax.jit(reference.update)
    for i, scale in enumerate((0.1, 3.0, 1.0, 1.0, 0.2)):
        grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)
        if i == 2:
            grads["a"] = grads["a"].at[0, 1].set(jnp.nan)
        if i == 3:
            grads["b"]["c"] = grads["b"]["c"].at[2].set(-jnp.inf)
        (updates, state), (expected, expected_state) = step(grads, state, params), expected_step(grads, expected_state,
                                                                                                 params)
        for got, want in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((expected, expected_state))):
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-6, atol=1e-7,
                                       err_msg=f"update {i}")
        params = optax.apply_updates(params, updates)
    if skip_nonfinite and accumulate_steps == 1:
        assert int(state.total_notfinite) == 2 and bool(state.last_finite)
