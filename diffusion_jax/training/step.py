"""The train step: a pure function (state, batch) -> (state, metrics), jitted once over a mesh.

Randomness: the step key is fold_in(state.rng, state.step); `training_loss` draws t and the
noise for the whole global batch from it, and with JAX's partitionable threefry every device
computes its own slice of that global draw, so devices never share noise and the sharded step
equals the unsharded one.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.builders import build_model, build_process, precondition_of
from diffusion_jax.conditions import condition_kind, drop_condition
from diffusion_jax.latents import model_input_shape
from diffusion_jax.losses import training_loss
from diffusion_jax.processes.edm import precondition
from diffusion_jax.parallel import batch_sharding, replicated, state_shardings
from diffusion_jax.optim import make_optimizer, tree_norm
from diffusion_jax.training.state import TrainState, ema_decay, ema_update, make_init_fn


def make_train_step(model, schedule, config, optimizer):
    """train_step(state, batch) -> (state, metrics) for batch {"image" [B, H, W, C], "cond"?: the
    condition kind's [B, ...]}; `schedule` is the run's process (`build_process`)."""
    d, t = config.diffusion, config.train
    sigma_data = precondition_of(config)
    kind = condition_kind(config)
    null = kind.null(config) if kind else None

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        key_loss, key_dropout, key_labels = jax.random.split(key, 3)
        cond = drop_condition(key_labels, batch.get("cond"), t.cond_dropout, null)

        def loss_fn(params):
            def denoise_fn(x_t, t_model):
                return model.apply({"params": params}, x_t, t_model, cond, train=True,
                                   rngs={"dropout": key_dropout})
            if sigma_data is not None:
                denoise_fn = precondition(denoise_fn, sigma_data)
            return training_loss(denoise_fn, schedule, batch["image"], key_loss,
                                 prediction=d.prediction, weighting=d.weighting,
                                 variance=d.variance, vlb_weight=d.vlb_weight,
                                 time_sampling=t.get("time_sampling", "uniform"),
                                 time_sampling_options=dict(t.get("time_sampling_options", {})))

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, t.ema_decay, t.ema_warmup)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay))
        metrics = {"loss": loss, "mse": jnp.mean(aux["mse"]), "grad_norm": tree_norm(grads)}
        return new_state, metrics

    return train_step


def make_multi_step(train_step, k: int):
    """K train steps in one lax.scan: (state, batches [K, B, ...]) -> (state, metrics of the last)."""
    if k == 1:
        return train_step

    def multi_step(state, batches):
        state, metrics = jax.lax.scan(train_step, state, batches)
        return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)

    return multi_step


def jit_train_step(step_fn, state_shapes, mesh, stacked: bool = False):
    """jax.jit over the mesh: state replicated (or fsdp-sharded), batch on the data axes,
    metrics replicated, the old state donated."""
    shardings = state_shardings(state_shapes, mesh)
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh, 1 if stacked else 0)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0), shardings


class TrainProgram(NamedTuple):
    """Everything compiled for a run: the model, schedule and optimiser, the jitted step, and
    `init(key)`, which builds a fresh TrainState directly in its shardings."""

    model: Any
    schedule: Any
    optimizer: Any
    step: Callable
    state_shapes: Any
    shardings: Any
    init: Callable


def build_train_program(config, mesh) -> TrainProgram:
    """The train step of a run's config over `mesh` (config.train.steps_per_dispatch steps a call)."""
    model, schedule = build_model(config), build_process(config)
    optimizer = make_optimizer(config.optim, config.train.steps)
    k = max(int(config.train.steps_per_dispatch), 1)
    init = make_init_fn(model, optimizer, model_input_shape(config), config.seed)
    state_shapes = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    step, shardings = jit_train_step(make_multi_step(make_train_step(model, schedule, config, optimizer), k),
                                     state_shapes, mesh, stacked=k > 1)
    return TrainProgram(model, schedule, optimizer, step, state_shapes, shardings,
                        jax.jit(init, out_shardings=shardings))
