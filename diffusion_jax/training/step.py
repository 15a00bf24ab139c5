"""The train step: a pure function (state, batch) -> (state, metrics), jitted once over a mesh.

Randomness: the step key is fold_in(state.rng, state.step); `training_loss` draws t and the
noise for the whole global batch from it, and with JAX's partitionable threefry every device
computes its own slice of that global draw, so devices never share noise and the sharded step
equals the unsharded one.
"""
from __future__ import annotations

import os

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
from diffusion_jax.config import lora_scale, lora_settings
from diffusion_jax.lora import adapter_layers, init_adapters, with_adapters
from diffusion_jax.runs import lora_parts
from diffusion_jax.training.state import TrainState, create_train_state, ema_decay, ema_update, make_init_fn


def make_train_step(model, schedule, config, optimizer, model_params=None):
    """train_step(state, batch, frozen=None) -> (state, metrics) for batch {"image" [B, H, W, C],
    "cond"?: the condition kind's [B, ...]}; `schedule` is the run's process (`build_process`).
    `model_params(params, frozen)` makes the model's parameters of the trained ones (a LoRA run's
    adapters on its frozen base); by default they are the model's."""
    d, t = config.diffusion, config.train
    sigma_data = precondition_of(config)
    kind = condition_kind(config)
    null = kind.null(config) if kind else None

    def train_step(state: TrainState, batch: dict, frozen=None):
        key = jax.random.fold_in(state.rng, state.step)
        key_loss, key_dropout, key_labels = jax.random.split(key, 3)
        cond = drop_condition(key_labels, batch.get("cond"), t.cond_dropout, null)

        def loss_fn(params):
            applied = params if model_params is None else model_params(params, frozen)

            def denoise_fn(x_t, t_model):
                return model.apply({"params": applied}, x_t, t_model, cond, train=True,
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

    def multi_step(state, batches, frozen=None):
        state, metrics = jax.lax.scan(lambda s, b: train_step(s, b, frozen), state, batches)
        return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)

    return multi_step


def jit_train_step(step_fn, state_shapes, mesh, stacked: bool = False, frozen_shapes=None):
    """jax.jit over the mesh: state replicated (or fsdp-sharded), batch on the data axes, the
    frozen parameters (a LoRA run's base; `frozen_shapes`) like the state, metrics replicated, the
    old state donated."""
    shardings = state_shardings(state_shapes, mesh)
    inputs = (shardings, batch_sharding(mesh, 1 if stacked else 0))
    if frozen_shapes is not None:
        inputs += (state_shardings(frozen_shapes, mesh),)
    return jax.jit(step_fn, in_shardings=inputs, out_shardings=(shardings, replicated(mesh)), donate_argnums=0), shardings


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
    model_params: Callable = lambda params: params  # the model's parameters of the trained ones (LoRA: merged)


def build_train_program(config, mesh) -> TrainProgram:
    """The train step of a run's config over `mesh` (config.train.steps_per_dispatch steps a call);
    a LoRA run's (`config.lora`) trains its adapters on its base run's frozen EMA parameters."""
    model, schedule = build_model(config), build_process(config)
    optimizer = make_optimizer(config.optim, config.train.steps)
    k = max(int(config.train.steps_per_dispatch), 1)
    section = lora_settings(config)
    merged = frozen = frozen_shapes = None
    if section is None:
        init = make_init_fn(model, optimizer, model_input_shape(config), config.seed)
    else:
        # the base run's absolute path and step are recorded: it may move on, this run's model does not
        section.base = os.path.abspath(section.base)
        spec, base = lora_parts(config, model)
        if int(section.base_step) < 0:
            section.base_step = base.step
        scale, rank = lora_scale(section), int(section.rank)
        frozen_shapes = jax.eval_shape(lambda p: p, base.ema_params)
        frozen = jax.device_put(base.ema_params, state_shardings(frozen_shapes, mesh))

        def init(key):
            return create_train_state(init_adapters(key, spec, frozen_shapes, rank), optimizer, config.seed)

        merged = lambda params, base_params: with_adapters(base_params, adapter_layers(params, spec, scale))
    state_shapes = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    jitted, shardings = jit_train_step(make_multi_step(make_train_step(model, schedule, config, optimizer, merged), k),
                                       state_shapes, mesh, stacked=k > 1, frozen_shapes=frozen_shapes)
    if merged is None:
        return TrainProgram(model, schedule, optimizer, jitted, state_shapes, shardings,
                            jax.jit(init, out_shardings=shardings))
    return TrainProgram(model, schedule, optimizer, lambda state, batch: jitted(state, batch, frozen), state_shapes,
                        shardings, jax.jit(init, out_shardings=shardings), lambda params: merged(params, frozen))
