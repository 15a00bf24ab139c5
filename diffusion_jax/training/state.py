"""The train state: one pytree (step, params, EMA params, optimizer state, RNG key)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.models import example_condition


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit for bit; a pytree (jit/shard/checkpoint it).

    `rng` is a raw uint32 key (jax.random.PRNGKey layout) so checkpoints stay plain arrays;
    the step's randomness is fold_in(rng, step), never a key carried forward.
    """

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jnp.ndarray


def create_train_state(params, optimizer, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def make_init_fn(model, optimizer, input_shape, seed: int):
    """init(key) -> the TrainState of fresh parameters for inputs [1, *input_shape]; use it
    under jax.eval_shape for shapes, or jax.jit(init, out_shardings=...) to build it sharded."""

    def init(key):
        x = jnp.zeros((1, *input_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        params = model.init({"params": key, "dropout": key}, x, t, example_condition(model))["params"]
        return create_train_state(params, optimizer, seed)

    return init


def ema_decay(step, decay: float, warmup: bool):
    """min(decay, (1 + step) / (10 + step)) with warm-up, so early EMA weights are not noise."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(decay, jnp.float32)


def ema_update(ema, params, decay):
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
