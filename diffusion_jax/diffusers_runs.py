"""A diffusers model as a run directory, and a run as a diffusers model directory.

`import`: the run's config describes the imported module (`model.name` a preset of its class,
`model.overrides` every field of the module), its data shape, and the scheduler's settings; its
step-0 checkpoint holds the imported weights as params and EMA params, so `sample`, `evaluate`
and `train` (fine-tuning, with more steps) work on it as on any run.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import ml_collections

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_json_object, write_json_atomically
from diffusion_jax.conditions import condition_kind
from diffusion_jax.conditions.text import text_encoder_source
from diffusion_jax.builders import IMPLEMENTATION_FIELDS, RUN_FIELDS, build_model
from diffusion_jax.latents import model_input_shape
from diffusion_jax.interop import Imported, save_diffusers, scheduler
from diffusion_jax.models import DiT, UNet, param_shapes
from diffusion_jax.likelihood import discrete_schedule

log = logging.getLogger(__name__)

# The preset each class's imports are based on; model.overrides replaces all of its fields.
_BASE_PRESET = {UNet: "ddpm_cifar10", DiT: "dit_xl2"}


def run_config(imported: Imported, config: ml_collections.ConfigDict, vae: str = "",
               text_encoder: str = "") -> ml_collections.ConfigDict:
    """`config` (a base config) set up for the imported backbone: model, data shape, labels, and
    the diffusion and sampling settings of its scheduler config (defaults without one). With
    `vae` (a diffusers AutoencoderKL directory or repository id) the backbone is a latent one:
    the data are images of the size whose latents it takes. With `text_encoder` (a Stable
    Diffusion pipeline's directory) the run is text-conditioned, guided at 7.5 by default."""
    model = imported.model
    if type(model) not in _BASE_PRESET:
        raise UsageError(f"a run needs a denoising backbone (UNet2DModel or DiTTransformer2DModel), got "
                         f"{imported.config.get('_class_name')}: give the backbone's directory (or --subfolder)")
    config = ml_collections.ConfigDict(config.to_dict())
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in RUN_FIELDS + IMPLEMENTATION_FIELDS}
    config.model.name = _BASE_PRESET[type(model)]
    config.model.overrides = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in fields.items()})
    config.data.image_size, _, config.data.channels = imported.input_shape
    if vae:
        from diffusion_jax import latents
        autoencoder = latents.load_vae(vae).model
        if autoencoder.latent_channels != imported.input_shape[2]:
            raise UsageError(f"the VAE {vae} makes {autoencoder.latent_channels}-channel latents but the backbone "
                             f"takes {imported.input_shape[2]} channels: give the VAE it was trained with")
        config.model.vae = vae
        config.data.image_size = imported.input_shape[0] * autoencoder.downsample_factor
        config.data.channels = autoencoder.in_channels
    config.data.num_classes = int(getattr(model, "num_classes", 0) or 0)
    config.data.use_labels = config.data.num_classes > 0
    context_dim = int(getattr(model, "context_dim", 0) or 0)
    if bool(context_dim) != bool(text_encoder):
        raise UsageError("a text-conditioned U-Net (UNet2DConditionModel) imports with its pipeline's text encoder: "
                         "give the pipeline's directory without --subfolder" if context_dim else
                         "a text encoder was given for a backbone that takes no text")
    if text_encoder:
        from diffusion_jax.interop import files
        encoders = [f for f in ("text_encoder", "text_encoder_2") if (files.resolve(text_encoder) / f).is_dir()]
        hidden = sum(files.read_config(files.resolve(text_encoder) / f).get("hidden_size", 0) for f in encoders)
        if hidden != context_dim:
            raise UsageError(f"the text encoders' width {hidden} is not the U-Net's cross-attention width {context_dim}")
        config.model.text_encoder = text_encoder
        sdxl = len(encoders) == 2
        config.data.condition = "sdxl" if sdxl else ""
        config.sample.guidance_scale = 5.0 if sdxl else 7.5  # the pipelines' defaults, with 50 steps
        config.sample.method, config.sample.options, config.sample.steps = *pipeline_chain(imported), 50
    learn_sigma = bool(getattr(model, "learn_sigma", False))
    settings = scheduler.settings_from_scheduler(imported.scheduler_config or {}, learn_sigma)
    for key, value in settings["diffusion"].items():
        config.diffusion[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    if imported.scheduler_config:
        config.sample.update(settings["sample"])
    return config


def pipeline_chain(imported: Imported) -> tuple[str, ml_collections.ConfigDict]:
    """(method, options) of the chain the imported pipeline's scheduler config names
    (`scheduler.pipeline_sampler`); DDIM on its timesteps for a scheduler not modelled here."""
    config = imported.scheduler_config or {}
    try:
        method, options, _ = scheduler.pipeline_sampler(config)
    except UsageError as e:
        log.warning("the run samples with DDIM on the scheduler's timesteps: %s", e)
        method, options, _ = scheduler.pipeline_sampler({**config, "_class_name": "DDIMScheduler"})
    return method, ml_collections.ConfigDict(options)


def write_imported_run(imported: Imported, config, workdir) -> pathlib.Path:
    """config.json and a step-0 checkpoint whose params and EMA params are the imported ones."""
    from diffusion_jax.checkpoints import Checkpointer
    from diffusion_jax.config import validate_config
    from diffusion_jax.optim import make_optimizer
    from diffusion_jax.training.state import create_train_state
    from diffusion_jax.workdir import check_workdir, write_config

    validate_config(config)
    workdir = check_workdir(workdir)
    checkpoints = workdir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise UsageError(f"{workdir} already holds a run's checkpoints: import into a new directory")
    model = build_model(config)
    expected = param_shapes(model, model_input_shape(config))
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(imported.params):
        raise UsageError("the run's config builds a model whose parameters differ from the imported ones; "
                         "do not override model settings on import")
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = jax.jit(lambda params: create_train_state(params, optimizer, config.seed))(imported.params)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        ckpt.save(0, state, config)
        ckpt.wait()
    finally:
        ckpt.close()
    write_config(workdir, config, None)
    log.info("imported %s into %s (step 0)", imported.config.get("_class_name"), workdir)
    return workdir


def export_run(workdir, out, step: int | None = None) -> pathlib.Path:
    """The run's EMA parameters (newest good checkpoint, or `step`) as a diffusers model
    directory with its schedule as scheduler/scheduler_config.json."""
    from diffusion_jax.files import ensure_new_dir
    from diffusion_jax.runs import load_run

    run = load_run(workdir, step)
    process, d = run.schedule, run.config.diffusion
    if text_encoder_source(run.config):
        return export_pipeline(run, out)
    schedule = discrete_schedule(process)  # written as a DDPMScheduler; the other processes by their own
    if schedule is None:  # checked before anything is written
        process_scheduler = scheduler.process_scheduler_config(process, d.prediction)
    ensure_new_dir(out, "--out")
    path = save_diffusers(out, run.model, run.ema_params, schedule,
                          input_shape=model_input_shape(run.config), prediction=d.prediction, variance=d.variance,
                          clip_x0=bool(run.config.sample.clip_x0))
    if schedule is None:
        (path / "scheduler").mkdir(exist_ok=True)
        write_json_atomically(path / "scheduler" / "scheduler_config.json", process_scheduler)
    return path


def export_lora(workdir, out, step: int | None = None) -> pathlib.Path:
    """A LoRA run's EMA adapters (newest good checkpoint, or `step`; the text encoders' too with
    lora.text_encoder) as a PEFT LoRA file with diffusers' metadata; an existing file is never
    overwritten."""
    from diffusion_jax.interop.adapters import backbone_component
    from diffusion_jax.lora import write_lora
    from diffusion_jax.runs import load_run

    out = pathlib.Path(out)
    if out.exists():
        raise UsageError(f"--lora {out} exists already: give a new file name")
    run = load_run(workdir, step)
    if run.adapters is None:
        raise UsageError(f"{workdir} is not a LoRA run (config.lora.rank is 0): export its model with --out DIR")
    return write_lora(out, {backbone_component(run.model): run.adapters, **run.condition_adapters})


def export_pipeline(run, out) -> pathlib.Path:
    """A text-conditioned run as a StableDiffusionPipeline directory: model_index.json, unet/ (the
    EMA parameters), vae/, text_encoder/, tokenizer/ and scheduler/ (the imported pipeline's
    scheduler config when there was one, else DDIM on the run's schedule); an SDXL run (its
    condition kind's) as a StableDiffusionXLPipeline, with text_encoder_2/ and tokenizer_2/."""
    from diffusion_jax import latents
    from diffusion_jax.files import ensure_new_dir
    from diffusion_jax.interop import files
    from diffusion_jax.interop.pipeline import save_pipeline
    from diffusion_jax.interop.text_encoders import RANDOM, second_text_encoder_parts, text_encoder_parts
    from diffusion_jax.conditions.sdxl import SDXL_KIND

    c, d = run.config, run.config.diffusion
    if discrete_schedule(run.schedule) is None or not latents.vae_source(c):
        raise UsageError("a StableDiffusionPipeline is a DDPM-schedule latent model: this text run has "
                         f"{'no VAE' if not latents.vae_source(c) else 'process ' + repr(run.schedule.name)}")
    where = text_encoder_source(c)  # a local directory or a Hub id, resolved as the text encoder was
    encoder, tokenizer = text_encoder_parts(where)
    vae = latents.load_vae(latents.vae_source(c))
    source = None if where == RANDOM else files.resolve(where) / "scheduler" / "scheduler_config.json"
    config = read_json_object(source, "") if source is not None and source.exists() else {
        **scheduler.scheduler_config(run.schedule, d.prediction, d.variance, bool(c.sample.clip_x0)),
        "_class_name": "DDIMScheduler", "set_alpha_to_one": False, "steps_offset": 1}
    ensure_new_dir(out, "--out")
    unet = Imported(run.model, run.ema_params, {}, model_input_shape(c))
    second = second_text_encoder_parts(where) if condition_kind(c) is SDXL_KIND else None
    return save_pipeline(out, unet, vae, encoder, tokenizer, config, second)
