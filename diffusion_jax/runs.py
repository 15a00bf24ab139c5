"""A training run read back from its workdir: its config, model, schedule and the EMA
parameters of its newest good checkpoint (or of a chosen step), read-only.

    run = load_run("runs/digits")
    generate = make_generator(run.model, run.schedule, run.config, batch_size=64)
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections

from diffusion_jax.errors import UsageError
from diffusion_jax.builders import build_model, build_process
from diffusion_jax.files import read_json_object
from diffusion_jax.latents import model_input_shape
from diffusion_jax.models import param_shapes
from diffusion_jax.parallel import make_mesh, replicated
from diffusion_jax.checkpoints import Checkpointer
from diffusion_jax.config import TEXT_ENCODER_TARGETS, lora_scale, lora_settings, lora_targets, trains_text_encoder
from diffusion_jax.lora import adapter_layers, adapter_spec, init_adapters, with_adapters

log = logging.getLogger(__name__)


class Run(NamedTuple):
    config: ml_collections.ConfigDict
    model: Any
    ema_params: Any  # a LoRA run's: its base's with the adapters added to the adapted kernels
    schedule: Any  # the run's process: DDPM's Schedule, or a continuous process (builders.build_process)
    step: int
    adapters: Any = None  # a LoRA run's EMA adapters, as LoraLayers (`lora`); None for other runs
    condition_adapters: dict = {}  # a LoRA run's adapters on its text encoder(s): {component: LoraLayers}


def lora_parts(config, model) -> tuple:
    """(the adapted layers' spec, the base run) of a LoRA run (`config.lora`): the base run's model
    must be this run's."""
    from diffusion_jax.config import config_fingerprint
    from diffusion_jax.interop import entries_for

    section = lora_settings(config)
    step = int(section.get("base_step", -1))
    base = load_run(section.base, None if step < 0 else step)
    if config_fingerprint(base.config)["model"] != config_fingerprint(config)["model"]:
        raise UsageError(f"lora.base {section.base} is a run of another model than this LoRA run's: train the adapters "
                         "with the base run's model settings")
    return adapter_spec(entries_for(model, model_input_shape(config)), lora_targets(section)), base


def encoder_lora_specs(config) -> dict:
    """{component: adapter spec} of a LoRA run's adapters on its text encoder(s) (lora.text_encoder:
    TEXT_ENCODER_TARGETS of each encoder its condition kind runs); {} for other runs."""
    if not trains_text_encoder(config):
        return {}
    from diffusion_jax.conditions import condition_kind
    from diffusion_jax.interop import clip

    return {component: adapter_spec(clip.entries(encoder.model), TEXT_ENCODER_TARGETS)
            for component, encoder in condition_kind(config).encoders(config).items()}


def init_run_adapters(key, config, spec, base_params, rank: int):
    """A LoRA run's trained parameters: the backbone's adapters (`init_adapters`); with adapters on the
    text encoder(s) too, {"backbone": those, component: each encoder's}."""
    backbone = init_adapters(key, spec, base_params, rank)
    specs = encoder_lora_specs(config)
    if not specs:
        return backbone
    from diffusion_jax.conditions import condition_kind

    encoders = condition_kind(config).encoders(config)
    return {"backbone": backbone, **{component: init_adapters(jax.random.fold_in(key, i + 1), encoder_spec,
                                                              encoders[component].params, rank)
                                     for i, (component, encoder_spec) in enumerate(specs.items())}}


def run_adapter_layers(adapters, config, spec, scale: float) -> tuple:
    """(the backbone's LoraLayers, {text encoder component: LoraLayers}) of a LoRA run's adapters."""
    specs = encoder_lora_specs(config)
    if not specs:
        return adapter_layers(adapters, spec, scale), {}
    return adapter_layers(adapters["backbone"], spec, scale), {
        component: adapter_layers(adapters[component], encoder_spec, scale) for component, encoder_spec in specs.items()}


def load_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run in {workdir!r}: {path} is missing (train into it first)")
    from diffusion_jax.config import migrate_config

    return ml_collections.ConfigDict(migrate_config(read_json_object(
        path, "the run's config.json is damaged: restore it from a config.STEP.json beside it, or train a new run")))


def load_run(workdir, step: int | None = None) -> Run:
    """The config, model, EMA params and schedule of a run: its newest checkpoint that restores
    and verifies (a corrupt one is skipped with a warning, never moved: this is read-only), or
    the checkpoint at `step`, which must be good."""
    config = load_config(workdir)
    model = build_model(config)
    section = lora_settings(config)
    if section is not None:
        spec, base = lora_parts(config, model)
        abstract = jax.eval_shape(lambda key: init_run_adapters(key, config, spec, base.ema_params, int(section.rank)),
                                  jax.random.key(0))
    else:
        abstract = param_shapes(model, model_input_shape(config))
    everywhere = replicated(make_mesh())  # restored onto every device, ready for sharded sampling
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first")
        if step is not None and step not in steps:
            raise UsageError(f"no checkpoint at step {step} in {workdir}; available: {steps}")
        restored, record = ckpt.restore_latest({"ema_params": abstract}, config, fields=("ema_params",),
                                               step=step, read_only=True)
        if restored is None:
            raise FileNotFoundError(f"no usable checkpoint in {ckpt.directory}: every one of {steps} is corrupt")
        if section is None:
            return Run(config, model, restored["ema_params"], build_process(config), int(record["step"]))
        layers, encoder_layers = run_adapter_layers(restored["ema_params"], config, spec, lora_scale(section))
        return Run(config, model, with_adapters(base.ema_params, layers), build_process(config), int(record["step"]),
                   layers, encoder_layers)
    finally:
        ckpt.close()
