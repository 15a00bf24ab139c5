"""Samples of a run's model: batched, sharded over a mesh, compiled once per sampler setting.

    generate = make_generator(run.model, run.schedule, run.config, batch_size=64)
    x0 = generate(run.ema_params, num_samples=64, key=jax.random.key(0))

Conditions and guidance are decided by the run's condition kind (`conditions`), the sampler
settings in `config`, LoRA files by `config.sample.loras` (`interop.adapters.with_sample_loras`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import latents
from diffusion_jax.builders import denoise_fn_for, precondition_of
from diffusion_jax.conditions import by_index, condition_kind, given_values, guidance_enabled, taking_kind
from diffusion_jax.config import sampler_settings
from diffusion_jax.errors import UsageError
from diffusion_jax.interop.adapters import backbone_component, run_loras, sample_loras
from diffusion_jax.kept import ByContent, kept
from diffusion_jax.lora import merge
from diffusion_jax.models import param_shapes
from diffusion_jax.parallel import batch_sharding, make_mesh, to_host
from diffusion_jax.samplers import guided_denoise_fn, sample
from diffusion_jax.schedules import Schedule

_keys_for = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def make_generator(model, schedule: Schedule, config, *, batch_size: int = 256, method=None,
                   steps=None, options=None, eta=None, trajectory_every=None, mesh=None,
                   per_sample_keys: bool = False, condition_adapters=None):
    """A function generate(params, num_samples, key, eta=None, guidance_scale=None, conditions=None,
    first_index=0, labels=None, prompts=None, negative_prompt=None, condition_adapters=None) ->
    images [N, H, W, C] in [-1, 1] (NumPy), sampling in batches sharded over `mesh`.
    `condition_adapters` ({component: LoraLayers}: a LoRA run's `Run.condition_adapters`) are the
    adapters of the condition's text encoders, by default those given here.

    A conditional run's sample i gets conditions[i % len(conditions)], values of the run's
    condition kind (`conditions`; by default its `default_values`: classes 0, 1, 2, ... of a
    class-conditional run, the empty prompt of a text run). `labels=` and `prompts=` give them
    by name, refused by a run of another kind; a text run guides against `negative_prompt`
    (default the empty prompt).

    Samples are counted from 0, or with `per_sample_keys` from `first_index`, and sample i then
    draws all its noise from fold_in(key, i): a pure function of (parameters, settings, key, i),
    whatever the batch size, devices or split into calls.

    Compiled on first use, once for unguided and once for guided sampling; the key, eta and
    guidance scale are traced, so calls with other values reuse the program, and so does another
    generator made with the same settings (`batch_program`). Sampler settings
    default to config.sample (see `sampler_settings`); guidance rescale is
    config.sample.guidance_rescale. With `trajectory_every` it returns (images, trajectory of the first
    batch). A latent run (config.model.vae) samples latents and returns the decoded images (and
    trajectory).
    """
    s = config.sample
    method, steps, options = sampler_settings(config, schedule, method, steps, options, eta=eta)
    takes_eta = "eta" in options  # sampler_settings gives it to a sampler that takes it, and only then
    default_eta = options.pop("eta", None)
    rescale = float(s.get("guidance_rescale", 0.0)) or None
    mesh = mesh or make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
    shape = (batch_size, *latents.model_input_shape(config))
    vae = latents.load_vae(latents.vae_source(config)) if latents.vae_source(config) else None
    kind = condition_kind(config)
    encode = kind.encoder(config) if kind else None
    default_adapters = condition_adapters
    loras = _backbone_loras(model, config)

    run = batch_program(model, ByContent(schedule), method, steps, tuple(sorted(options.items())), takes_eta,
                        bool(s.clip_x0), config.diffusion.prediction, precondition_of(config), rescale, trajectory_every,
                        mesh, shape, None if vae is None else vae.model)

    def generate(params, num_samples: int, key, eta=None, guidance_scale=None, conditions=None,
                 first_index: int = 0, labels=None, prompts=None, negative_prompt=None, condition_adapters=None):
        if negative_prompt:
            taking_kind(config, "negative_prompt")
        if num_samples < 1:
            raise UsageError(f"the number of samples must be at least 1, got {num_samples}")
        if eta is not None and not takes_eta:
            raise UsageError(f"eta = {eta} given, but sampler {method!r} has no eta (only ddim takes one)")
        eta = default_eta if eta is None else eta
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance_enabled(config, guidance_scale)
        values = given_values(config, conditions=conditions, labels=labels, prompts=prompts)
        if kind is not None and values is None:
            values = kind.default_values(config)
        adapters = condition_adapters or default_adapters
        encoded = kind.encoder(config, adapters) if adapters else encode
        null = None if kind is None else kind.null(config, negative_prompt, adapters) if adapters else \
            kind.null(config, negative_prompt)
        params = merge(params, loras)
        out, trajectory = [], None
        for i in range(-(-num_samples // batch_size)):
            # the batch's sample indices, the last batch padded with the next ones
            index = (first_index if per_sample_keys else 0) + i * batch_size + np.arange(batch_size)
            cond = None if kind is None else encoded(by_index(values, index))
            batch_key = jax.random.fold_in(key, i)
            if per_sample_keys:
                batch_key = _keys_for(key, jnp.asarray(index, jnp.int32))
            result = run(guided, params, None if vae is None else vae.params, batch_key, jnp.float32(0.0 if eta is None else eta),
                         jnp.float32(guidance_scale), cond, null)
            if trajectory_every:
                result, traj = result
                if trajectory is None:
                    trajectory = jax.tree_util.tree_map(to_host, traj)
            out.append(to_host(result))
        images = np.concatenate(out)[:num_samples]
        return (images, trajectory) if trajectory_every else images

    return generate


@kept(maxsize=16)
def batch_program(model, schedule: ByContent, method: str, steps, options: tuple, takes_eta: bool, clip_x0: bool,
                  prediction: str, sigma_data, rescale, trajectory_every, mesh, shape: tuple, vae_model):
    """The jitted program of one batch of `make_generator`: (guided (static), params, vae_params, key,
    eta, guidance_scale, cond, null_cond) -> images, or latents decoded by `vae_model` (and the
    trajectory); `cond` the batch's condition (its kind's encoding, batch first; None
    unconditional), `null_cond` the null condition guidance contrasts it with; `params` with the
    backbone's LoRA layers merged (the same program with or without them). Kept for the last 16
    settings: a generator made again with them (another command, a sweep) traces nothing."""

    @functools.partial(jax.jit, static_argnums=0)
    def run(guided, params, vae_params, key, eta, guidance_scale, cond, null_cond):
        kw = dict(method=method, num_steps=steps, clip_x0=clip_x0, prediction=prediction,
                  trajectory_every=trajectory_every, sharding=batch_sharding(mesh), **dict(options))
        if takes_eta:
            kw.update(eta=eta)
        denoise = denoise_fn_for(model, params, cond is not None, sigma_data)
        if cond is not None:
            denoise = guided_denoise_fn(denoise, cond, *((null_cond, guidance_scale, rescale) if guided else ()))
        out = sample(denoise, schedule.tree, shape, key, **kw)
        if vae_model is None:
            return out
        decode = functools.partial(latents.decode_latents, vae_model, vae_params)
        if trajectory_every:
            images, trajectory = out
            return decode(images), {**trajectory, "x_t": jax.lax.map(decode, trajectory["x_t"]),
                                    "pred_x0": jax.lax.map(decode, trajectory["pred_x0"])}
        return decode(out)

    return run


def _backbone_loras(model, config) -> tuple:
    """The LoRA layers of `config.sample.loras` on the backbone (the text encoder's are the text
    condition's to read)."""
    if not sample_loras(config):
        return ()
    shape, component = latents.model_input_shape(config), backbone_component(model)
    kind = condition_kind(config)
    others = tuple(kind.encoders(config)) if kind else ()
    return run_loras(config, {component: (model, shape, param_shapes(model, shape))}, others).get(component, ())
