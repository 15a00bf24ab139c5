"""What a training run is, rebuilt from its config: model, schedule, denoise_fn; restoring a
run's EMA parameters (`load_run`) and generating batched, sharded samples from them.

    run = load_run("runs/digits")
    generate = make_generator(run.model, run.schedule, run.config, batch_size=64)
    x0 = generate(run.ema_params, num_samples=64, key=jax.random.key(0))
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.models import create_model, param_shapes
from diffusion_jax.parallel import batch_sharding, make_mesh, replicated, to_host
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import Schedule, make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config):
    """The Flax module of a run: the preset, with dtype, remat, labels and learned sigma."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {config.model.dtype!r}; choose one of {sorted(DTYPES)}")
    overrides = dict(config.model.overrides)
    overrides.update(dtype=DTYPES[config.model.dtype], remat=config.model.remat,
                     learn_sigma=config.diffusion.variance == "learned_range",
                     num_classes=config.data.num_classes if config.data.use_labels else 0)
    return create_model(config.model.name, **overrides)


def build_schedule(config) -> Schedule:
    return make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def input_shape(config) -> tuple:
    return (config.data.image_size, config.data.image_size, config.data.channels)


def denoise_fn_for(model, params, with_labels: bool):
    """The `denoise_fn(x_t, t[, y])` closure of a model and its parameters (inference mode)."""
    if with_labels:
        return lambda x, t, y: model.apply({"params": params}, x, t, y)
    return lambda x, t: model.apply({"params": params}, x, t)


class Run(NamedTuple):
    config: ml_collections.ConfigDict
    model: Any
    ema_params: Any
    schedule: Schedule
    step: int


def load_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run in {workdir!r}: {path} is missing (train into it first)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_run(workdir, step: int | None = None) -> Run:
    """The config, model, EMA params and schedule of a run (latest good checkpoint, or `step`)."""
    from diffusion_jax.training.checkpoint import CheckpointMismatch, Checkpointer

    config = load_config(workdir)
    model = build_model(config)
    abstract = param_shapes(model, input_shape(config))
    everywhere = replicated(make_mesh())  # restored onto every device, ready for sharded sampling
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {workdir}; available: {steps}")
        for s in ([step] if step is not None else reversed(steps)):
            try:
                ckpt.check_params(s, abstract)
                restored = ckpt.manager.restore(s, args=_ema_only_args(abstract))
                return Run(config, model, restored["state"]["ema_params"], build_schedule(config), s)
            except CheckpointMismatch:
                raise
            except Exception as e:
                if step is not None:
                    raise
                print(f"warning: checkpoint {s} is unreadable ({type(e).__name__}); trying the previous one")
        raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
    finally:
        ckpt.close()


def _ema_only_args(abstract_params):
    import orbax.checkpoint as ocp

    target = {"ema_params": abstract_params}
    return ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree_util.tree_map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target),
        partial_restore=True))


def sample_labels(config, num_samples: int):
    """Class labels for samples (0, 1, ..., cycling), or None for an unconditional run."""
    if not config.data.use_labels:
        return None
    return jnp.arange(num_samples, dtype=jnp.int32) % config.data.num_classes


def make_generator(model, schedule: Schedule, config, *, batch_size: int = 256, method=None,
                   steps=None, guided=None, trajectory_every=None, mesh=None):
    """A function generate(params, num_samples, key, eta=None, guidance_scale=None, labels=None)
    -> images [N, H, W, C] in [-1, 1] (NumPy), sampling in batches sharded over `mesh`.

    Compiled once, on first use; the key, eta and guidance scale are traced, so calls with
    other values reuse the program. Sampler settings default to config.sample. With
    `trajectory_every` it returns (images, trajectory of the first batch).
    """
    s = config.sample
    method, steps = method or s.method, steps or s.steps
    if method == "ddpm" and steps >= schedule.num_timesteps:
        steps = None
    mesh = mesh or make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
    with_labels = bool(config.data.use_labels)
    if guided is None:
        guided = with_labels and s.guidance_scale != 1.0
    shape = (batch_size, *input_shape(config))

    @jax.jit
    def run(params, key, eta, guidance_scale, labels):
        kw = dict(method=method, num_steps=steps, eta=eta, clip_x0=bool(s.clip_x0),
                  variance=config.diffusion.variance, prediction=config.diffusion.prediction,
                  trajectory_every=trajectory_every, sharding=batch_sharding(mesh))
        if with_labels:
            kw.update(cond=labels)
            if guided:
                kw.update(guidance_scale=guidance_scale, null_cond=model.num_classes)
        return sample(denoise_fn_for(model, params, with_labels), schedule, shape, key, **kw)

    def generate(params, num_samples: int, key, eta=None, guidance_scale=None, labels=None):
        eta = s.eta if eta is None else eta
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        if labels is None:
            labels = sample_labels(config, num_samples)
        out, trajectory = [], None
        for i in range(-(-num_samples // batch_size)):
            batch_labels = jnp.zeros((batch_size,), jnp.int32)
            if labels is not None:
                batch_labels = jnp.resize(jnp.asarray(labels, jnp.int32)[i * batch_size:(i + 1) * batch_size],
                                          (batch_size,))
            result = run(params, jax.random.fold_in(key, i), jnp.float32(eta),
                         jnp.float32(guidance_scale), batch_labels)
            if trajectory_every:
                result, traj = result
                if trajectory is None:
                    trajectory = jax.tree_util.tree_map(to_host, traj)
            out.append(to_host(result))
        images = np.concatenate(out)[:num_samples]
        return (images, trajectory) if trajectory_every else images

    return generate
