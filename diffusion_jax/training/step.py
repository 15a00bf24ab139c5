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
from diffusion_jax import executable_cache
from diffusion_jax.compile_effort import jit_once
from diffusion_jax.errors import UsageError
from diffusion_jax.conditions import broadcast_condition, condition_kind, drop_condition, dropped_examples
from diffusion_jax.latents import model_input_shape
from diffusion_jax.losses import training_loss
from diffusion_jax.objectives import GUIDED, Unconditional
from diffusion_jax.processes.edm import precondition
from diffusion_jax.parallel import batch_sharding, replicated, state_shardings
from diffusion_jax.optim import make_optimizer, tree_norm
from diffusion_jax.config import lora_scale, lora_settings, trains_text_encoder
from diffusion_jax.lora import with_adapters
from diffusion_jax.runs import init_run_adapters, lora_parts, run_adapter_layers
from diffusion_jax.training.state import TrainState, create_train_state, ema_decay, ema_update, make_init_fn


def make_train_step(model, schedule, config, optimizer, model_params=None, condition=None):
    """train_step(state, batch, frozen=None) -> (state, metrics) for batch {"image" [B, H, W, C],
    "cond"?: the condition kind's [B, ...]}; `schedule` is the run's process (`build_process`).
    `model_params(params, frozen)` makes the model's parameters of the trained ones (a LoRA run's
    adapters on its frozen base); by default they are the model's. With `condition(params, frozen,
    inputs)` the batch's "cond" holds the condition kind's inputs, made the condition here (a LoRA
    run that trains the text encoders' adapters)."""
    d, t = config.diffusion, config.train
    sigma_data = precondition_of(config)
    kind = condition_kind(config)
    null = kind.null(config) if kind and condition is None else None
    objective = d.get("objective", "denoise")
    guided = null is not None and objective in GUIDED and t.cond_dropout > 0  # the objective may fold guidance in

    def train_step(state: TrainState, batch: dict, frozen=None):
        key = jax.random.fold_in(state.rng, state.step)
        key_loss, key_dropout, key_labels = jax.random.split(key, 3)
        given = batch.get("cond") if condition is not None else \
            drop_condition(key_labels, batch.get("cond"), t.cond_dropout, null)

        def loss_fn(params):
            applied = params if model_params is None else model_params(params, frozen)
            cond = given if condition is None else condition(params, frozen, given)

            def conditioned(cond):
                def denoise_fn(x_t, t_model, **r):  # r=: a two-time model's second time
                    return model.apply({"params": applied}, x_t, t_model, cond, train=True,
                                       rngs={"dropout": key_dropout}, **r)
                return denoise_fn if sigma_data is None else precondition(denoise_fn, sigma_data)

            unconditional = None
            if guided:
                images = batch["image"].shape[0]
                unconditional = Unconditional(conditioned(broadcast_condition(null, images)),
                                              dropped_examples(key_labels, given, t.cond_dropout))
            return training_loss(conditioned(cond), schedule, batch["image"], key_loss,
                                 prediction=d.prediction, weighting=d.weighting,
                                 variance=d.variance, vlb_weight=d.vlb_weight,
                                 time_sampling=t.get("time_sampling", "uniform"),
                                 time_sampling_options=dict(t.get("time_sampling_options", {})),
                                 objective=objective, objective_options=dict(d.get("objective_options", {})),
                                 unconditional=unconditional)

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


def initial_params(config, model):
    """The EMA parameters of the run `train.init_from` (its newest good checkpoint, or
    `train.init_from_step`), pinned in the config (absolute path, step), as this run's model's: a
    one-time model's with the zero projection of a two-time model's second time added
    (`models.with_second_time`); a model of other parameters is refused."""
    from diffusion_jax.models import param_shapes, with_second_time
    from diffusion_jax.runs import load_run

    t = config.train
    t.init_from = os.path.abspath(t.init_from)
    source = load_run(t.init_from, None if int(t.get("init_from_step", -1)) < 0 else int(t.init_from_step))
    t.init_from_step = source.step
    shape = model_input_shape(config)
    params = with_second_time(source.ema_params, model, shape) if getattr(model, "second_time", False) else \
        source.ema_params
    expected = param_shapes(model, shape)
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(expected) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected))):
        raise UsageError(f"train.init_from {t.init_from} is a run of another model (its parameters differ from this "
                         "run's): start from a run of the same model settings")
    return params


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
    condition_adapters: Callable = lambda params: {}  # the text encoders' adapters of the trained ones (LoRA)


def build_train_program(config, mesh) -> TrainProgram:
    """The train step of a run's config over `mesh` (config.train.steps_per_dispatch steps a call);
    a LoRA run's (`config.lora`) trains its adapters on its base run's frozen EMA parameters."""
    model, schedule = build_model(config), build_process(config)
    optimizer = make_optimizer(config.optim, config.train.steps)
    k = max(int(config.train.steps_per_dispatch), 1)
    section, kind = lora_settings(config), condition_kind(config)
    merged = frozen = frozen_shapes = condition = None
    if section is None:
        init = make_init_fn(model, optimizer, model_input_shape(config), config.seed)
    else:
        # the base run's absolute path and step are recorded: it may move on, this run's model does not
        section.base = os.path.abspath(section.base)
        spec, base = lora_parts(config, model)
        if int(section.base_step) < 0:
            section.base_step = base.step
        scale, rank = lora_scale(section), int(section.rank)
        text = trains_text_encoder(config)
        # frozen: the base run's EMA parameters, and with lora.text_encoder {"backbone": those, "encoders": theirs}
        frozen = base.ema_params
        if text:
            frozen = {"backbone": frozen, "encoders": {c: e.params for c, e in kind.encoders(config).items()}}
        frozen_shapes = jax.eval_shape(lambda p: p, frozen)
        frozen = jax.device_put(frozen, state_shardings(frozen_shapes, mesh))
        backbone = (lambda f: f["backbone"]) if text else (lambda f: f)

        def init(key):
            return create_train_state(init_run_adapters(key, config, spec, backbone(frozen_shapes), rank), optimizer,
                                      config.seed)

        layers = lambda params: run_adapter_layers(params, config, spec, scale)
        merged = lambda params, frozen_params: with_adapters(backbone(frozen_params), layers(params)[0])
        if text:
            def condition(params, frozen_params, inputs):
                encoder_layers = layers(params)[1]
                return kind.condition(config, {c: with_adapters(p, encoder_layers[c])
                                               for c, p in frozen_params["encoders"].items()}, inputs)
    # programs decided by the config and their arguments alone are kept as executables
    cacheable = section is None and not (kind and kind.null_from_files)
    description = config.to_json(sort_keys=True) if cacheable else ""
    key = jax.random.PRNGKey(config.seed)
    state_shapes = executable_cache.shapes("state", init, description, key) if cacheable else \
        jax.eval_shape(init, key)
    jitted, shardings = jit_train_step(make_multi_step(make_train_step(model, schedule, config, optimizer, merged,
                                                                       condition), k),
                                       state_shapes, mesh, stacked=k > 1, frozen_shapes=frozen_shapes)
    if section is None and config.train.get("init_from", ""):  # read when a new run starts, never on resume
        placed = jax.jit(lambda params: create_train_state(params, optimizer, config.seed),
                         out_shardings=shardings)  # the parameters an argument, not constants
        start = lambda key: placed(initial_params(config, model))
    else:
        start = jit_once(init, out_shardings=shardings)
        if cacheable:
            start = executable_cache.cached("init", start, description)
    if cacheable:
        jitted = executable_cache.cached("train_step", jitted, description)
    if merged is None:
        return TrainProgram(model, schedule, optimizer, jitted, state_shapes, shardings, start)
    return TrainProgram(model, schedule, optimizer, lambda state, batch: jitted(state, batch, frozen), state_shapes,
                        shardings, start, lambda params: merged(params, frozen), lambda params: layers(params)[1])
